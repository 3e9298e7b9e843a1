"""The feature trial body: a feature method's classifier on cached backbone features, as a :class:`Stage`.

Where the features come from:

* ``feature_key`` set: that cache under ``feature_storage`` (default ``./ltstudy_results``);
  when it is missing and ``backbone`` is set, it is extracted first;
* else ``backbone`` (a checkpoint file): the key is derived from the checkpoint and its dataset, and the
  cache is extracted if needed (``ltstudy.features.extract``);
* or ``backbone`` a pretrained model (``timm:NAME``, ``open_clip:ARCH/TAG``, with ``pretrained=``): the key is
  derived from the model, its weights and the trial's own data settings.

The data split is always the backbone's own (its checkpoint config): the val/test images must be ones
the backbone never trained on. A pretrained backbone never saw the data: the trial's settings draw the split. The trial's dataset settings (:data:`CHECKED_KEYS`) are checked against it
(a mismatch is a ``ConfigError``); the trial's ``seed`` only seeds the classifier stage, so several seeds
can share one cache. No DataLoader: tensors stay on the device, batches come from ``torch.randperm``.
"""

from __future__ import annotations

from typing import Any

import torch

from ltstudy.config import DATA_KEYS, PATH_KEYS, TrialConfig, data_location
from ltstudy.errors import ConfigError
from ltstudy.features.extract import PRETRAINED_KEYS, extract_features, load_backbone_checkpoint
from ltstudy.features.store import Storage, cache_exists, load_split, open_storage, read_head, read_manifest
from ltstudy.methods import FeatureMethod, FeatureSet, MethodContext, get_method
from ltstudy.metrics import evaluation_metrics
from ltstudy.models import build_head, is_pretrained_name
from ltstudy.runtime import optimizer_step
from ltstudy.train.loop import Stage, TrialContext

#: dataset settings that must agree between a feature trial and its backbone (seed excluded: see above;
#: list files are paths, which may differ between machines)
CHECKED_KEYS = tuple(k for k in DATA_KEYS if k != "seed" and k not in PATH_KEYS)


def check_manifest(manifest: dict[str, Any], cfg: TrialConfig, opts: dict[str, Any]) -> None:
    """The cache must hold this trial's data (:data:`CHECKED_KEYS`) and what its method needs from it (feature
    maps, the number of augmented views); a preset ``feature_key`` is never trusted blindly."""
    key, t = manifest["key"], cfg.train
    fields = manifest.get("key_fields")
    if not isinstance(fields, dict) or "split_version" not in fields:
        raise ConfigError(f"feature cache {key} was written by an older ltstudy (no split version in its "
                          "manifest); extract the backbone's features again")
    for name in CHECKED_KEYS:
        if name in fields and fields[name] != getattr(t, name):
            raise ConfigError(f"feature cache {key} holds {name}={fields[name]!r}, the trial has "
                              f"{name}={getattr(t, name)!r}; feature trials use the backbone's data split")
    if opts.get("fmaps") and not fields.get("fmaps"):
        raise ConfigError(f"feature cache {key} holds no feature maps, which {t.method} needs; extract with "
                          "--fmaps (or drop feature_key to let the trial extract them)")
    want, have = int(opts.get("augmented_views", 0)), int(fields.get("augmented_views", 0))
    if want != have:
        raise ConfigError(f"feature cache {key} was extracted with augmented_views={have}, the trial asks for "
                          f"{want}; drop feature_key (with backbone set) to use a matching cache")


def resolve_features(cfg: TrialConfig, device: torch.device | str = "cpu") -> tuple[Storage, str]:
    """(storage, key) of the trial's feature cache, extracting it first when needed; checked against the
    trial (:func:`check_manifest`)."""
    t = cfg.train
    spec = get_method(t.method)
    opts = spec.extract_options(cfg.params) if issubclass(spec, FeatureMethod) else {}
    storage = open_storage(t.feature_storage)
    if t.feature_key and cache_exists(storage, t.feature_key):
        check_manifest(read_manifest(storage, t.feature_key), cfg, opts)
        return storage, t.feature_key
    if t.backbone is None:
        if t.feature_key:
            raise ConfigError(f"feature cache {t.feature_key} not found under {storage.uri}; set "
                              "backbone=CHECKPOINT to extract it")
        raise ConfigError(f"method {t.method!r} works on cached backbone features: set "
                          "backbone=CHECKPOINT (or feature_key=KEY)")
    if is_pretrained_name(t.backbone):
        result = extract_features(t.backbone, storage=storage, overrides=pretrained_overrides(t), device=device,
                                  fmaps=opts.get("fmaps", False), augmented_views=opts.get("augmented_views", 0))
        if t.feature_key and t.feature_key != result.key:
            raise ConfigError(f"feature_key {t.feature_key} does not match backbone {t.backbone} "
                              f"(its key is {result.key})")
        check_manifest(result.manifest, cfg, opts)
        return storage, result.key
    ckpt_cfg = load_backbone_checkpoint(t.backbone)["config"]
    for name in CHECKED_KEYS:
        if name in ckpt_cfg and ckpt_cfg[name] != getattr(t, name):
            raise ConfigError(f"{name}={getattr(t, name)!r} differs from the backbone's "
                              f"{name}={ckpt_cfg[name]!r} ({t.backbone}); feature trials use the "
                              "backbone's data split")
    result = extract_features(t.backbone, storage=storage, overrides=data_location(t), device=device,
                              fmaps=opts.get("fmaps", False),
                              augmented_views=opts.get("augmented_views", 0))
    if t.feature_key and t.feature_key != result.key:
        raise ConfigError(f"feature_key {t.feature_key} does not match backbone {t.backbone} "
                          f"(its key is {result.key})")
    check_manifest(result.manifest, cfg, opts)
    return storage, result.key


def pretrained_overrides(t: Any) -> dict[str, Any]:
    """What defines a pretrained backbone's features besides its name: the trial's data settings, where the
    data is, and the backbone's weights, constructor kwargs and evaluation crop."""
    keys = (*DATA_KEYS, *data_location(t), *PRETRAINED_KEYS)
    return {k: getattr(t, k) for k in dict.fromkeys(keys) if getattr(t, k) not in (None, {})}


def load_feature_set(storage: Storage, key: str, device: torch.device, *, fmaps: bool = False,
                     views: bool = False) -> FeatureSet:
    manifest = read_manifest(storage, key)
    train = load_split(storage, key, "train", device, fmaps=fmaps)
    val = load_split(storage, key, "val", device)
    test = load_split(storage, key, "test", device)
    sel = (train.views == 0).nonzero().flatten()
    train_x, train_y = train.features[sel], train.labels[sel]
    order = train.index[sel]
    view_list = None
    if views and int(train.views.max()) > 0:
        view_list = []
        for v in range(1, int(train.views.max()) + 1):
            rows = (train.views == v).nonzero().flatten()
            # the augmented rows are written in the same sample order as view 0
            if not torch.equal(train.index[rows], order):
                raise ConfigError(f"feature cache {key}: augmented view {v} is not aligned with view 0")
            view_list.append(train.features[rows])
    num_classes = int(manifest["num_classes"])
    head_state = read_head(storage, key, manifest)
    head = None
    if head_state is not None:
        head = build_head(head_state["type"], int(head_state["in_features"]), num_classes)
        head.load_state_dict(head_state["state_dict"])
        head = head.to(device).eval().requires_grad_(False)
    return FeatureSet(
        train_x=train_x, train_y=train_y, val_x=val.features, val_y=val.labels, test_x=test.features,
        test_y=test.labels, num_classes=num_classes,
        class_counts=torch.bincount(train_y, minlength=num_classes),
        head=head, head_type=head_state["type"] if head_state else "linear",
        train_maps=train.fmaps[sel] if fmaps and train.fmaps is not None else None,
        train_views=view_list,
    )


class FeatureStage(Stage):
    """A feature trial: the method's batches and batch loss on its classifier, the default update."""

    def __init__(self, cfg: TrialConfig, ctx: TrialContext, device: torch.device) -> None:
        t = cfg.train
        spec = get_method(t.method)
        if not issubclass(spec, FeatureMethod):
            raise ConfigError(f"method {t.method!r} is not a feature-stage method")
        storage, self.key = resolve_features(cfg, device)
        opts = spec.extract_options(cfg.params)
        self.feats = feats = load_feature_set(storage, self.key, device, fmaps=opts.get("fmaps", False),
                                              views=opts.get("augmented_views", 0) > 0)
        mctx = MethodContext(num_classes=feats.num_classes, class_counts=feats.class_counts, epochs=t.epochs,
                             device=device, model_name=t.model, train=t, rank=ctx.rank,
                             world_size=ctx.world_size, extras={"feature_key": self.key})
        torch.manual_seed(t.seed)
        method: FeatureMethod = spec(cfg.params, mctx)
        method.prepare(feats)
        self.cfg = t
        super().__init__(method, method.classifier(), cfg, device, len(feats.train_y))

    def batches(self, epoch: int) -> Any:
        self.module.train()
        return self.method.batches(epoch)

    def step(self, batch: Any) -> torch.Tensor:
        return optimizer_step(self.optimizer, self.method.batch_loss(batch))

    @torch.no_grad()
    def evaluate(self, split: str) -> tuple[dict[str, Any], list[float]]:
        self.module.eval()
        y = self.feats.val_y if split == "val" else self.feats.test_y
        logits = self.method.logits(split).float()
        return evaluation_metrics(logits, y, self.feats.class_counts, self.cfg.many_threshold,
                                  self.cfg.few_threshold)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "feature_key": self.key}
