"""The feature-stage trial: ``run_feature_trial(cfg, report, ctx) -> metrics``.

Same contract as :func:`ltstudy.train.run_trial` (per-epoch ``report(metrics, checkpoint_dir)`` with
``epoch, train_loss, lr, val_*``, ``val_per_class``; ``test_*`` after the last epoch), but the method
works on cached backbone features instead of images. Where the features come from:

* ``feature_key`` set: that cache under ``feature_storage`` (default ``./ltstudy_results``);
  when it is missing and ``backbone`` is set, it is extracted first;
* else ``backbone`` (a checkpoint file): the key is derived from the checkpoint and its dataset, and the
  cache is extracted if needed (``ltstudy.features.extract``).

The data split is always the backbone's own (its checkpoint config): the val/test images must be ones
the backbone never trained on. The trial's dataset settings are checked against it (a mismatch is a
``ConfigError``); the trial's ``seed`` only seeds the classifier stage, so several seeds can share one
cache. No DataLoader: tensors stay on the device, batches come from ``torch.randperm``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ltstudy.config import TrialConfig
from ltstudy.errors import ConfigError
from ltstudy.features.store import Storage, cache_exists, load_split, open_storage, read_head, read_manifest
from ltstudy.methods import MethodContext, get_method
from ltstudy.methods.feature_base import FeatureMethod, FeatureSet
from ltstudy.metrics import accuracy_metrics
from ltstudy.models import build_head
from ltstudy.train import (
    CHECKPOINT_FILE,
    NonFiniteLossError,
    Report,
    TrialContext,
    load_checkpoint,
    lr_factor,
    resolve_device,
    save_checkpoint,
)

#: dataset settings that must agree between a feature trial and its backbone (seed excluded: see above)
CHECKED_FIELDS = ("dataset", "imbalance", "profile", "val_per_class", "synthetic_classes")


def resolve_features(cfg: TrialConfig, device: torch.device | str = "cpu") -> tuple[Storage, str]:
    """(storage, key) of the trial's feature cache, extracting it first when needed."""
    t = cfg.train
    spec = get_method(t.method)
    opts = spec.extract_options(cfg.params) if issubclass(spec, FeatureMethod) else {}
    storage = open_storage(t.feature_storage)
    if t.feature_key and cache_exists(storage, t.feature_key):
        return storage, t.feature_key
    if t.backbone is None:
        if t.feature_key:
            raise ConfigError(f"feature cache {t.feature_key} not found under {storage.uri}; set "
                              "backbone=CHECKPOINT to extract it")
        raise ConfigError(f"method {t.method!r} works on cached backbone features: set "
                          "backbone=CHECKPOINT (or feature_key=KEY)")
    from ltstudy.features.extract import extract_features, load_backbone_checkpoint

    ckpt_cfg = load_backbone_checkpoint(t.backbone)["config"]
    for name in CHECKED_FIELDS:
        if name in ckpt_cfg and ckpt_cfg[name] != getattr(t, name):
            raise ConfigError(f"{name}={getattr(t, name)!r} differs from the backbone's "
                              f"{name}={ckpt_cfg[name]!r} ({t.backbone}); feature trials use the "
                              "backbone's data split")
    overrides = {k: getattr(t, k) for k in ("data_root", "download", "train_list", "val_list",
                                            "test_list") if getattr(t, k) is not None}
    result = extract_features(t.backbone, storage=storage, overrides=overrides, device=device,
                              fmaps=opts.get("fmaps", False),
                              augmented_views=opts.get("augmented_views", 0))
    if t.feature_key and t.feature_key != result.key:
        raise ConfigError(f"feature_key {t.feature_key} does not match backbone {t.backbone} "
                          f"(its key is {result.key})")
    return storage, result.key


def load_feature_set(storage: Storage, key: str, device: torch.device, *, fmaps: bool = False,
                     views: bool = False) -> FeatureSet:
    manifest = read_manifest(storage, key)
    train = load_split(storage, key, "train", device, fmaps=fmaps)
    val = load_split(storage, key, "val", device)
    test = load_split(storage, key, "test", device)
    base = train.views == 0
    sel = base.nonzero().flatten()
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


@torch.no_grad()
def _evaluate(method: FeatureMethod, split: str, feats: FeatureSet, t: Any) -> tuple[dict[str, float], list]:
    y = feats.val_y if split == "val" else feats.test_y
    logits = method.logits(split).float()
    metrics, per_class = accuracy_metrics(logits.argmax(1), y, feats.class_counts, t.many_threshold,
                                          t.few_threshold)
    metrics["loss"] = F.cross_entropy(logits, y).item() if len(y) else math.nan
    return metrics, per_class


def run_feature_trial(cfg: TrialConfig, report: Report | None = None,
                      ctx: TrialContext | None = None) -> dict[str, Any]:
    """Train and evaluate a feature-stage method; returns the last epoch's metrics (with test)."""
    ctx = ctx or TrialContext()
    t = cfg.train
    device = resolve_device(ctx.device if ctx.device is not None else t.device)
    spec = get_method(t.method)
    if not issubclass(spec, FeatureMethod):
        raise ConfigError(f"method {t.method!r} is not a feature-stage method")
    storage, key = resolve_features(cfg, device)
    opts = spec.extract_options(cfg.params)
    feats = load_feature_set(storage, key, device, fmaps=opts.get("fmaps", False),
                             views=opts.get("augmented_views", 0) > 0)
    mctx = MethodContext(num_classes=feats.num_classes, class_counts=feats.class_counts, epochs=t.epochs,
                         device=device, model_name=t.model, train=t, rank=ctx.rank,
                         world_size=ctx.world_size, extras={"feature_key": key})
    torch.manual_seed(t.seed)
    method: FeatureMethod = spec(cfg.params, mctx)
    method.prepare(feats)
    module = method.classifier()
    optimizer = method.make_optimizer(module, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, t))

    start = 0
    state = load_checkpoint(ctx.resume_from, device) if ctx.resume_from else None
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        start = int(state["epoch"])

    metrics: dict[str, Any] = {}
    n_train = len(feats.train_y)
    for epoch in range(start, t.epochs):
        torch.manual_seed(t.seed * 1_000_003 + epoch)
        method.on_epoch_start(epoch)
        module.train()
        tic = time.perf_counter()
        loss = float(method.train_epoch(epoch, optimizer))
        seconds = time.perf_counter() - tic
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss is {loss} in epoch {epoch + 1}")
        metrics = {"epoch": epoch + 1, "train_loss": loss, "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": seconds, "train_images_per_s": n_train / max(seconds, 1e-9)}
        scheduler.step()
        module.eval()
        val, val_pc = _evaluate(method, "val", feats, t)
        metrics.update({f"val_{k}": v for k, v in val.items()}, val_per_class=val_pc)
        if epoch + 1 == t.epochs:
            test, test_pc = _evaluate(method, "test", feats, t)
            metrics.update({f"test_{k}": v for k, v in test.items()}, test_per_class=test_pc)
        ckpt_dir = None
        if ctx.checkpoint_dir and ctx.rank == 0:
            ckpt_dir = ctx.checkpoint_dir
            save_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE, epoch=epoch + 1, model=module.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            method=method.state_dict(), config=cfg.to_dict(), feature_key=key)
        if report is not None:
            report(dict(metrics), ckpt_dir)
    return metrics
