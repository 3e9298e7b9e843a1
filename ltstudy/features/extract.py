"""Extract backbone features of the train / val / test splits into the feature cache.

Input is the trainer's ``checkpoint.pt`` (``model`` state dict + flat resolved ``config``). The dataset is
rebuilt from the checkpoint's own config (so the split is the one the backbone was trained on), with
optional ``key=value`` overrides (e.g. ``data_root`` on another machine). The backbone runs in eval mode.

Or a pretrained model, ``timm:NAME`` / ``open_clip:ARCH/TAG`` (``--backbone``), with its weights
(``pretrained=``, a local file; a hub tag is fetched first by :func:`ltstudy.config.stage_weights`) and
its own preprocessing (resolution, mean / std, interpolation, centre crop). It never saw the data, so the
dataset is the one the settings define (``dataset``, ``imbalance``, ``seed``, …), and the key holds the
model, its constructor kwargs, its weights' sha256 (a random initialisation is seeded, and named so) and
its preprocessing. Its cache has no classifier (``head.pt`` is absent): classifiers of feature methods
start fresh (``ce_classifier``, ``crt``, ``tailcalibx``), post-hoc rules need a trained backbone.

Per split, each row holds the sample's ``index`` (``Split.indices``: its position in the source split),
its ``label``, a ``view`` number and the pooled ``feature``; with ``fmaps`` the train split also holds the
last-stage feature map (``fmap``, shape in the manifest). Only train maps are stored: FSA fine-tunes
``avgpool -> fc`` on train maps, and on val/test ``fc(avgpool(map))`` is ``fc(feature)``, so storing their
maps would only cost space. The backbone's classifier (type + state dict) goes to ``head.pt``.

Train features use the eval transform (view 0). ``augmented_views = V`` adds V passes over the train
split with the training augmentation (views 1..V). TailCalibX's reference extracts its train features
*with* training augmentation and re-extracts every epoch; ltstudy keeps the eval-transform features as the
default (deterministic and reusable by every method) and offers the augmented views for TailCalibX,
which then cycles through them one view per epoch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ltstudy.config import (
    DATA_KEYS,
    DATA_LOCATION_KEYS,
    TrainConfig,
    TrialConfig,
    carved_sets,
    check_pretrained,
    load_data,
    resolve_config,
)
from ltstudy.data import SPLIT_VERSION, AugmentSpec, LTData, Preprocess, make_loader
from ltstudy.data.augment import apply as augment_batch
from ltstudy.data.augment import eval_batch
from ltstudy.errors import ConfigError, DataError
from ltstudy.features.store import (
    SPLITS,
    SplitArrays,
    Storage,
    cache_exists,
    cache_key,
    file_sha256,
    open_storage,
    read_manifest,
    remove_cache,
    write_cache,
)
from ltstudy.methods import get_method
from ltstudy.models import Classifier, build_backbone, build_model, is_pretrained_name
from ltstudy.models.weights import local_weights, weights_digest
from ltstudy.runtime import resolve_device

#: fields that are locations or runtime settings, not content: never part of the key
_NOT_CONTENT = (*DATA_LOCATION_KEYS, "device")


@dataclass
class ExtractResult:
    key: str
    storage: Storage
    rows: dict[str, int]
    reused: bool
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return self.storage.path(self.key)


def names_a_file(value: str) -> bool:
    """Whether a ``--backbone`` / ``--checkpoint`` value is a checkpoint path (else: a trial's MLflow run id)."""
    return Path(value).expanduser().exists() or "/" in value or value.endswith(".pt")


def load_backbone_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"backbone checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DataError(f"{path} is not a PyTorch checkpoint ({first.strip()[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"{path} is not an ltstudy checkpoint (needs 'model' and 'config')")
    version = int(state.get("split_version", 1))
    if version != SPLIT_VERSION:
        raise ConfigError(f"backbone {path} was trained on ltstudy's split version {version}; this ltstudy "
                          f"draws version {SPLIT_VERSION} (the standard long-tailed counts), so the training "
                          "split rebuilt from its config is not the one it saw: retrain the backbone")
    state["path"] = str(path.resolve())
    return state


def data_config(ckpt_config: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrialConfig:
    """The backbone's own trial config with ``overrides``: defines the data (carved sets included) and model.

    A checkpoint whose method settings no longer resolve keeps its training settings under ``ce``.
    """
    own = {k: v for k, v in ckpt_config.items() if k not in ("backbone", "feature_storage", "feature_key")}
    try:
        return resolve_config({**own, **(overrides or {})})
    except ConfigError:
        base = {k: v for k, v in own.items() if k in TrainConfig.model_fields and k != "method"}
        return resolve_config({**base, "method": "ce", **(overrides or {})})


def _list_digest(path: str | None) -> str | None:
    if not path:
        return None
    return file_sha256(path) if os.path.isfile(path) else os.path.basename(path)


def key_fields(checkpoint_sha256: str, cfg: TrialConfig, fmaps: bool, augmented_views: int,
               augment: AugmentSpec | None) -> dict[str, Any]:
    t = cfg.train
    fields: dict[str, Any] = {"checkpoint_sha256": checkpoint_sha256, "model": t.model,
                              "fmaps": bool(fmaps), "augmented_views": int(augmented_views),
                              "split_version": SPLIT_VERSION}
    for name in DATA_KEYS:
        value = getattr(t, name)
        fields[name] = _list_digest(value) if name.endswith("_list") else value
    if carved_sets(cfg):
        fields["carved"] = carved_sets(cfg)
    if is_pretrained_name(t.model):  # a fine-tuned timm / open_clip network: its evaluation crop shapes its features
        fields["crop_pct"] = t.crop_pct
    if augmented_views:
        fields["augment"] = vars(augment) if augment is not None else None
    return fields


def _augment_spec(t: TrainConfig) -> AugmentSpec:
    return AugmentSpec.of(t)


@torch.no_grad()
def compute_features(model: Classifier | torch.nn.Module, data: LTData, split: str, device: torch.device, *,
                     batch_size: int = 256, fmaps: bool = False, augment: AugmentSpec | None = None,
                     generator: torch.Generator | None = None, pre: Preprocess | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled features (N, D) and optionally last-stage maps (N, C, H, W) of one split, in split order.

    ``model`` is a classifier (its backbone runs) or a backbone; ``pre`` a pretrained model's preprocessing
    (the centre crop at its side, its statistics)."""
    model.eval()
    backbone = model.backbone if isinstance(model, Classifier) else model
    part = getattr(data, split)
    feats, maps = [], []

    def run(x: torch.Tensor) -> None:
        if hasattr(backbone, "extract"):  # a pretrained backbone pools its own way (class token, head)
            f, m = backbone.extract(x, fmaps)
        else:
            m = backbone.forward_features(x)
            f = torch.flatten(F.adaptive_avg_pool2d(m, 1), 1)
        feats.append(f.float().cpu())
        if fmaps and m is not None:
            maps.append(m.float().cpu())

    if part.images is not None:
        mean = torch.tensor(pre.mean if pre else data.mean, device=device)
        std = torch.tensor(pre.std if pre else data.std, device=device)
        for start in range(0, len(part), batch_size):
            x = part.images[start:start + batch_size].to(device)
            x = augment_batch(augment, x, mean, std, generator, pre) if augment else eval_batch(x, mean, std, pre)[0]
            run(x)
    else:
        if augment is not None:
            raise ConfigError("augmented feature views need an in-memory dataset (CIFAR, synthetic)")
        loader = make_loader(data, split, batch_size=batch_size, device=device, train=False, preprocess=pre)
        for x, _ in loader:
            run(x)
    out = torch.cat(feats) if feats else torch.zeros(0, int(backbone.feature_dim))
    if len(out) != len(part):
        raise DataError(f"extracted {len(out)} rows for {split}, the split has {len(part)}")
    return out, (torch.cat(maps) if fmaps and maps else None)


def build_backbone_model(ckpt: dict[str, Any], cfg: TrainConfig, num_classes: int) -> tuple[Classifier, str]:
    try:
        head = getattr(get_method(ckpt["config"].get("method", "ce")), "head", "linear")
    except ConfigError:
        head = "linear"
    # a fine-tuned timm / open_clip network: its architecture from model_kwargs, its weights from the checkpoint
    options = {"pretrained": "none", "model_kwargs": dict(cfg.model_kwargs)} if is_pretrained_name(cfg.model) else {}
    model = build_model(cfg.model, num_classes, head=head, **options)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise DataError(f"checkpoint {ckpt['path']} does not fit model {cfg.model!r}/{head}: "
                        f"{str(exc).splitlines()[0]}") from None
    return model, head


#: the settings of a pretrained backbone that are not data: its weights, constructor and evaluation crop
PRETRAINED_KEYS = ("pretrained", "model_kwargs", "weights_cache", "crop_pct")
#: the seed of a randomly initialised pretrained backbone (tests, benchmarks), part of its key
RANDOM_INIT_SEED = 0


def pretrained_config(name: str, overrides: dict[str, Any] | None = None) -> TrialConfig:
    """The data (and weights) config of a pretrained backbone: the settings given, ``model`` the backbone."""
    values = {k: v for k, v in (overrides or {}).items() if k not in ("backbone", "feature_storage", "feature_key",
                                                                      "method")}
    cfg = resolve_config({**values, "method": "ce", "model": name})
    check_pretrained(cfg.train)
    return cfg


def _pretrained_key(name: str, overrides: dict[str, Any] | None, fmaps: bool, augmented_views: int
                    ) -> tuple[str, dict[str, Any], TrialConfig, dict[str, Any]]:
    cfg = pretrained_config(name, overrides)
    t = cfg.train
    weights = local_weights(name, t.pretrained, t.weights_cache)
    fields: dict[str, Any] = {"backbone": name, "model_kwargs": dict(t.model_kwargs), "crop_pct": t.crop_pct,
                              "weights_sha256": weights_digest(weights) if weights else
                              f"random-init(seed {RANDOM_INIT_SEED})",
                              "fmaps": bool(fmaps), "augmented_views": int(augmented_views),
                              "split_version": SPLIT_VERSION}
    for key in DATA_KEYS:
        value = getattr(t, key)
        fields[key] = _list_digest(value) if key.endswith("_list") else value
    if augmented_views:
        fields["augment"] = vars(_augment_spec(t))
    source = {"path": weights or "random-init", "name": name, "config": {k: v for k, v in cfg.to_dict().items()
                                                                           if k in (*DATA_KEYS, *PRETRAINED_KEYS)}}
    return cache_key(fields), fields, cfg, source


def pretrained_backbone(cfg: TrialConfig) -> torch.nn.Module:
    """The pretrained backbone of a :func:`pretrained_config`, randomly initialised with a fixed seed when
    it has no weights."""
    t = cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_backbone(t.model, **t.backbone_options())


def resolve_key(checkpoint: str | Path, overrides: dict[str, Any] | None = None, *, fmaps: bool = False,
                augmented_views: int = 0) -> tuple[str, dict[str, Any], TrialConfig, dict[str, Any]]:
    """(key, key fields, data config, checkpoint) without extracting anything; ``checkpoint`` may be a
    pretrained model's name (then the last item describes its weights)."""
    if is_pretrained_name(str(checkpoint)):
        return _pretrained_key(str(checkpoint), overrides, fmaps, augmented_views)
    ckpt = load_backbone_checkpoint(checkpoint)
    cfg = data_config(ckpt["config"], overrides)
    sha = file_sha256(ckpt["path"])
    fields = key_fields(sha, cfg, fmaps, augmented_views, _augment_spec(cfg.train))
    return cache_key(fields), fields, cfg, ckpt


def _with_views(model: Classifier, data: LTData, plain: SplitArrays, t: TrainConfig, dev: torch.device,
                views: int, batch_size: int, fmaps: bool, pre: Any) -> SplitArrays:
    """The training split with ``views`` augmented views of every image after the plain one."""
    gen = torch.Generator(device=dev).manual_seed(t.seed * 7919 + 1)
    spec = _augment_spec(t)
    feats, maps = [plain.features], [plain.fmaps] if plain.fmaps is not None else None
    for _v in range(views):
        f, m = compute_features(model, data, "train", dev, batch_size=batch_size, fmaps=fmaps, augment=spec,
                                generator=gen, pre=pre)
        feats.append(f)
        if maps is not None:
            maps.append(m)
    n = len(data.train)
    return SplitArrays(plain.index.repeat(views + 1), plain.labels.repeat(views + 1), torch.cat(feats),
                       torch.cat(maps) if maps is not None else None,
                       torch.arange(views + 1).repeat_interleave(n))


def _extractor(checkpoint: str | Path, ckpt: dict[str, Any], cfg: TrialConfig, data: LTData):
    """(network, head type or None, preprocessing or None) of a trained checkpoint or a pretrained model."""
    t = cfg.train
    if is_pretrained_name(str(checkpoint)):
        model, head = pretrained_backbone(cfg), None
    else:
        model, head = build_backbone_model(ckpt, t, data.num_classes)
    pre = model.preprocess  # a fine-tuned pretrained network keeps its library's preprocessing
    if pre is not None and t.crop_pct:
        pre = replace(pre, crop_pct=t.crop_pct)
    return model, head, pre


def _cache_info(checkpoint: str | Path, ckpt: dict[str, Any], fields: dict[str, Any], cfg: TrialConfig,
                data: LTData, head: str | None, pre: Any, augmented_views: int) -> dict[str, Any]:
    """What the manifest says about where the features came from."""
    if is_pretrained_name(str(checkpoint)):
        source = {"path": ckpt["path"], "sha256": fields["weights_sha256"], "pretrained": ckpt["name"],
                  "preprocess": pre.describe() if pre is not None else None}
    else:
        source = {"path": ckpt["path"], "sha256": fields["checkpoint_sha256"], "epoch": int(ckpt.get("epoch", 0) or 0)}
    return {
        "source_checkpoint": source, "key_fields": fields, "dataset": data.name, "num_classes": data.num_classes,
        "class_counts": [int(c) for c in data.class_counts.tolist()], "class_names": list(data.class_names),
        "model": cfg.train.model, "head_type": head if head is not None else "none",
        "augmented_views": int(augmented_views),
        "backbone_config": {k: v for k, v in ckpt["config"].items() if k not in _NOT_CONTENT},
    }


def extract_features(checkpoint: str | Path, *, storage: str | Storage | None = None,
                     overrides: dict[str, Any] | None = None, fmaps: bool = False,
                     augmented_views: int = 0, device: str | torch.device = "auto",
                     batch_size: int = 256, endpoint_override: str | None = None,
                     force: bool = False) -> ExtractResult:
    """Make sure the cache for (checkpoint, dataset, options) exists; extract it when missing or damaged."""
    tic = time.perf_counter()
    if augmented_views < 0:
        raise ConfigError("augmented_views must be >= 0")
    st = storage if isinstance(storage, Storage) else open_storage(storage, endpoint_override)
    key, fields, cfg, ckpt = resolve_key(checkpoint, overrides, fmaps=fmaps, augmented_views=augmented_views)
    if cache_exists(st, key) and not force:
        try:
            manifest = read_manifest(st, key, verify_files=True)
            return ExtractResult(key, st, manifest["rows"], True, time.perf_counter() - tic, manifest)
        except DataError:
            pass  # damaged: rebuild below
    if cache_exists(st, key) or force:
        remove_cache(st, key)
    dev = resolve_device(device)
    data = load_data(cfg)
    model, head, pre = _extractor(checkpoint, ckpt, cfg, data)
    model.to(dev).eval()
    splits: dict[str, SplitArrays] = {}
    for split in SPLITS:
        part = getattr(data, split)
        feats, maps = compute_features(model, data, split, dev, batch_size=batch_size,
                                       fmaps=fmaps and split == "train", pre=pre)
        splits[split] = SplitArrays(part.indices.clone(), part.labels.clone(), feats, maps)
    if augmented_views:
        splits["train"] = _with_views(model, data, splits["train"], cfg.train, dev, augmented_views, batch_size,
                                      fmaps, pre)
    head_state = None if head is None else {
        "type": head, "num_classes": data.num_classes, "in_features": model.feature_dim,
        "state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()}}
    info = _cache_info(checkpoint, ckpt, fields, cfg, data, head, pre, augmented_views)
    write_cache(st, key, splits, head=head_state, info=info)  # False: a concurrent writer won
    manifest = read_manifest(st, key, verify_files=True)
    return ExtractResult(key, st, manifest["rows"], False, time.perf_counter() - tic, manifest)
