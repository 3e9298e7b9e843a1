"""One configuration path: YAML file → typed config → ``key=value`` overrides → resolved config.

A trial is described by a flat mapping of keys. Each key is either a training setting (a field of
:class:`TrainConfig`) or a hyperparameter declared by the chosen method (a field of its ``Params``).
Unset keys fall back to the method's published recipe for the dataset's family (``Method.recipes``:
CIFAR-10-LT, CIFAR-100-LT, ImageNet-LT / Places-LT / iNaturalist), then to the defaults below. Unknown
keys, unknown dataset or model names and values of the wrong type raise
:class:`~ltstudy.errors.ConfigError`.

This module sits above ``ltstudy.methods`` (a trial config is the training settings plus the chosen
method's ``Params``) and below everything that runs trials. It is the one place that says which keys
define a dataset (:data:`DATA_KEYS`) and which keys are paths (:data:`PATH_KEYS`).
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ltstudy.data import DATASETS, LTData, build_data, dataset_family
from ltstudy.errors import ConfigError
from ltstudy.methods import get_method
from ltstudy.methods.feature import FeatureMethod
from ltstudy.methods.image import ImageMethod
from ltstudy.models import is_pretrained_name, known_model, list_models
from ltstudy.models.weights import parse_model_name, weights_source

#: Marks the published configuration (the first trial of a study) in a Tune trial's config.
PUBLISHED_KEY = "ltstudy_published"
#: Marks a confirmation run in a Tune trial's config: the id of the study trial it re-runs.
CONFIRMS_KEY = "ltstudy_confirms"
#: Marks a successive-halving run's budget in a Tune trial's config: "epochs/full epochs".
BUDGET_KEY = "ltstudy_budget"
#: Keys a config may carry that are not settings (provenance, study markers): ignored when resolving.
META_KEYS = ("provenance", PUBLISHED_KEY, CONFIRMS_KEY, BUDGET_KEY)
#: The keys that define a dataset and its split: two trials that agree on them (and on the method's
#: carved sets) see the same train / val / test images.
DATA_KEYS = ("dataset", "imbalance", "profile", "val_per_class", "seed", "image_size", "synthetic_classes",
             "train_list", "val_list", "test_list")
#: The keys whose values are file-system paths (made absolute before a trial runs in another folder).
PATH_KEYS = ("data_root", "train_list", "val_list", "test_list", "backbone", "class_names", "weights_cache")
#: Where the data is and how it is read: needed to load a dataset, but not part of what it is.
DATA_LOCATION_KEYS = ("data_root", "download", "num_workers", "class_names")


class TrainConfig(BaseModel):
    """Settings shared by every method: data, model, optimisation, evaluation, runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    method: str = Field("ce", description="registered method name (`ltstudy methods`)")
    # data
    dataset: str = Field("cifar10-lt", description="cifar10-lt | cifar100-lt | filelist | synthetic")
    data_root: str | None = Field(None, description="folder holding the dataset")
    download: bool = Field(False, description="fetch a missing CIFAR folder with torchvision")
    imbalance: float = Field(100.0, ge=1.0, description="imbalance factor n_max/n_min")
    profile: Literal["exp", "step"] = Field("exp", description="long-tail profile")
    val_per_class: int = Field(20, ge=1, description="balanced validation images per class")
    train_list: str | None = Field(None, description="file-list datasets: train list")
    val_list: str | None = Field(None, description="file-list datasets: validation list")
    test_list: str | None = Field(None, description="file-list datasets: test list")
    image_size: int | None = Field(
        None, ge=8, description="image side (default: 224 for file lists, 32 for synthetic data)"
    )
    synthetic_classes: int = Field(10, ge=2, description="synthetic dataset: number of classes")
    class_names: str | None = Field(None, description="file lists: class-names file (one name per line in label "
                                                      "order, or LIFT's classnames.txt / categories.json); CIFAR's "
                                                      "names come from its meta batch")
    # augmentation and sampling
    crop_padding: int = Field(4, ge=0, description="random-crop padding (0 = no crop)")
    crop_pad_mode: Literal["zeros", "reflect"] = Field("zeros", description="random-crop padding: zeros "
                                                       "or a reflection of the image border")
    color_augment: bool = Field(False, description="file lists: MoCo-v2 colour jitter, grayscale and blur "
                                                   "after the random crop (FSGL's ImageNet-LT recipe)")
    flip: bool = Field(True, description="random horizontal flip")
    cutout: int = Field(0, ge=0, description="Cutout square size (0 = off)")
    autoaugment: bool = Field(False, description="AutoAugment (CIFAR-10 policy)")
    random_resized_crop: bool = Field(False, description="in-memory data (CIFAR): random resized crop (scale "
                                                         "0.08-1) on the device, to a pretrained model's side")
    sampler: Literal["instance", "class_balanced", "sqrt", "power"] = Field(
        "instance", description="training sampler"
    )
    sampler_q: float = Field(0.5, ge=0.0, description="exponent q of the power sampler (n_c^-q)")
    # model
    model: str = Field("resnet32", description="backbone: resnet32 | resnet32_w4 | resnet34_cifar | resnet50 | "
                                                "resnext50_32x4d | timm:NAME | open_clip:ARCH/TAG")
    pretrained: str | None = Field(None, description="timm / open_clip models: a local weights file "
                                   "(.safetensors or a checkpoint), a hub tag, or none (random init); default: "
                                   "the tag in the model name, else none")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm / open_clip models: keyword "
                                         "arguments of the library's constructor (e.g. a tiny ViT)")
    weights_cache: str | None = Field(None, description="where hub weights are fetched to (default "
                                                        "STORAGE/weights, ./ltstudy_results/weights)")
    crop_pct: float | None = Field(None, gt=0.0, le=1.0, description="pretrained models, evaluation: the shorter "
                                   "side resized to size / crop_pct, then the centre crop (default: the "
                                   "model's own)")
    # optimisation
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (momentum, nesterov) or AdamW")
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(2e-4, ge=0.0)
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    warmup_epochs: int = Field(5, ge=0, description="linear warm-up epochs")
    schedule: Literal["step", "cosine", "constant"] = "step"
    milestones: tuple[float, ...] | None = Field(
        None, description="step schedule: fractions of the epochs where lr *= gamma (default: the method's "
                          "phase switch and halfway from it to the end where the reference ties the lr to "
                          "it, else 0.8 and 0.9)"
    )
    gamma: float = Field(0.01, gt=0.0, description="step schedule factor")
    # evaluation
    many_threshold: int = Field(100, ge=0, description="many-shot: more than this many train images")
    few_threshold: int = Field(20, ge=0, description="few-shot: fewer than this many train images")
    eval_batch_size: int = Field(512, ge=1)
    # runtime
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(True, description="mixed precision on CUDA")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA")
    num_workers: int | None = Field(None, ge=0, description="decoding workers for file-list data")
    # feature stage (methods with stage == "feature")
    backbone: str | None = Field(None, description="feature-stage methods: the backbone whose features are "
                                                   "cached; metasaug train_scope=classifier: the stage-1 "
                                                   "network it starts from (a checkpoint file)")
    feature_storage: str | None = Field(
        None, description="feature cache root URI (local path, NFS, s3://bucket/prefix); "
                          "default ./ltstudy_results"
    )
    feature_key: str | None = Field(None, description="feature cache key (set by `features extract`)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; choose one of {', '.join(DATASETS)}")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if not known_model(value):
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(list_models())}, timm:NAME "
                             "or open_clip:ARCH/TAG")
        if is_pretrained_name(value):
            parse_model_name(value)  # syntax here; the library and its weights are checked before a trial
        return value

    @property
    def pretrained_model(self) -> str | None:
        """The timm / open_clip model this trial runs: ``model`` (image methods) or ``backbone`` (feature
        methods whose backbone is a pretrained model), else None."""
        spec = get_method(self.method)
        if issubclass(spec, FeatureMethod):
            return self.backbone if is_pretrained_name(self.backbone) else None
        return self.model if is_pretrained_name(self.model) else None

    def backbone_options(self) -> dict[str, Any]:
        """What ``ltstudy.models.build_backbone`` takes besides the name: the weights and constructor kwargs."""
        return {"pretrained": self.pretrained, "model_kwargs": dict(self.model_kwargs),
                "weights_cache": self.weights_cache} if is_pretrained_name(self.model) else {}


@dataclass(frozen=True)
class TrialConfig:
    """A resolved trial: the training settings plus the method's typed hyperparameters."""

    train: TrainConfig
    params: BaseModel

    @property
    def method(self) -> str:
        return self.train.method

    def to_dict(self) -> dict[str, Any]:
        """Flat mapping of every resolved key, suitable for YAML and for ``resolve_config``."""
        flat = self.train.model_dump(mode="json")
        flat.update(self.params.model_dump(mode="json"))
        return flat

    def replace(self, **changes: Any) -> TrialConfig:
        """A copy with some keys changed (validated like any override)."""
        return resolve_config({**self.to_dict(), **changes})


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config or search-space file as a mapping; any problem is one ``ConfigError`` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> dict[str, Any]:
    """A YAML mapping from text; malformed YAML or another type is one ``ConfigError`` line naming ``where``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"malformed YAML in {where}{line}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of key: value, not {type(data).__name__}")
    return data


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["lr=0.05", "milestones=[0.5,0.75]"]`` into a mapping; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _unknown_key(key: str, method: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown key {key!r}: not a training setting nor a hyperparameter of method {method!r}{hint}"
    )


def _validation_error(exc: ValidationError, method: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "config"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    return ConfigError(f"bad value for {key!r} ({method}): {msg}, got {got!r}")


def published_recipe(method: str, dataset: str, imbalance: float | None = None) -> dict[str, Any]:
    """The method's published settings for the dataset's family (and imbalance factor, where a reference
    publishes values per IF); every key is checked to be a training setting or a hyperparameter."""
    spec = get_method(method)
    recipe = spec.recipe(dataset_family(dataset)).resolved(imbalance)
    known = set(TrainConfig.model_fields) | set(spec.Params.model_fields)
    bad = sorted(set(recipe) - known)
    if bad:
        raise ConfigError(f"method {method!r}: recipe key {bad[0]!r} is not a training setting or hyperparameter")
    return recipe


def resolve_config(values: dict[str, Any] | None = None, **explicit: Any) -> TrialConfig:
    """Resolve a flat mapping (plus explicit keyword settings that win) into a :class:`TrialConfig`.

    Precedence, lowest first: ``TrainConfig`` and ``Params`` defaults, the method's published recipe for
    the dataset's family (:func:`published_recipe`), ``values``, then ``explicit`` entries that are not
    ``None``.
    """
    merged = {k: v for k, v in (values or {}).items() if k not in META_KEYS}
    merged.update({k: v for k, v in explicit.items() if v is not None})
    method_name = merged.get("method", TrainConfig.model_fields["method"].default)
    spec = get_method(method_name)
    train_keys = set(TrainConfig.model_fields)
    param_keys = set(spec.Params.model_fields)
    dataset = merged.get("dataset", TrainConfig.model_fields["dataset"].default)
    imbalance = merged.get("imbalance", TrainConfig.model_fields["imbalance"].default)
    try:
        imbalance = float(imbalance)
    except (TypeError, ValueError):
        imbalance = None  # TrainConfig names the bad value below
    recipe = published_recipe(spec.name, dataset, imbalance) if dataset in DATASETS else {}
    train_values = {k: v for k, v in recipe.items() if k in train_keys}
    train_values["method"] = spec.name
    param_values = {k: v for k, v in recipe.items() if k in param_keys}
    for key, value in merged.items():
        if key in train_keys:
            train_values[key] = value
        elif key in param_keys:
            param_values[key] = value
        else:
            raise _unknown_key(key, spec.name, sorted(train_keys | param_keys))
    try:
        train = TrainConfig(**train_values)
        params = spec.Params(**param_values)
    except ValidationError as exc:
        raise _validation_error(exc, spec.name) from None
    return TrialConfig(train=train, params=params)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                **explicit: Any) -> TrialConfig:
    """The CLI's path: optional YAML file, then explicit flags, then ``key=value`` overrides."""
    values = load_yaml(path) if path else {}
    values.update({k: v for k, v in explicit.items() if v is not None})
    values.update(parse_overrides(overrides))
    return resolve_config(values)


def check_runnable(cfg: TrialConfig) -> TrialConfig:
    """Raise :class:`ConfigError` when the method cannot run this config (e.g. MetaSAug's classifier-only
    recipe without a stage-1 ``backbone``); returns ``cfg``. A pretrained model's library must be installed
    and know the architecture, and a local weights file must fit it tensor for tensor (checked without
    loading it: :func:`ltstudy.models.pretrained.meta_fits`)."""
    check_pretrained(cfg.train)
    get_method(cfg.method).check(cfg.train, cfg.params)
    return cfg


def check_pretrained(t: TrainConfig) -> None:
    name = t.pretrained_model
    if name is None:
        if t.pretrained is not None or t.model_kwargs:
            raise ConfigError(f"pretrained= and model_kwargs= apply to timm: and open_clip: models; this trial "
                              f"runs {t.model!r}")
        return
    from ltstudy.models.pretrained import check_model_name, meta_fits

    check_model_name(name)
    src = weights_source(name, t.pretrained)
    if src.kind == "file":
        meta_fits(name, src.path, t.model_kwargs)


def stage_weights(cfg: TrialConfig, storage: str | None = None) -> dict[str, Any]:
    """On the driver, before any trial: fetch the hub weights a config names into the weights cache
    (``weights_cache``, else ``STORAGE/weights``) once, check the file against the model, and return the
    settings that pin it for every trial (``pretrained=<local file>``), so no trial reaches the hub."""
    t = cfg.train
    name = t.pretrained_model
    if name is None:
        return {}
    from ltstudy.models.pretrained import check_model_name, meta_fits
    from ltstudy.models.weights import DEFAULT_CACHE, fetch_weights

    check_model_name(name)
    cache = t.weights_cache or (str(Path(storage) / "weights") if storage and "://" not in storage else DEFAULT_CACHE)
    path = fetch_weights(name, t.pretrained, cache)
    if path is None:
        return {}
    meta_fits(name, path, t.model_kwargs)
    return {"pretrained": path}


def lr_milestones(cfg: TrialConfig) -> tuple[float, ...]:
    """The step schedule's milestones: the trial's, else the ones the method ties to its phase switch,
    else 0.8 and 0.9 of the epochs."""
    if cfg.train.milestones is not None:
        return tuple(cfg.train.milestones)
    return get_method(cfg.method).lr_milestones(cfg.params) or (0.8, 0.9)


def carved_sets(cfg: TrialConfig) -> dict[str, int]:
    """The extra per-class sets the trial's method carves from the training pool (MetaSAug's meta set)."""
    spec = get_method(cfg.method)
    return spec.carved_sets(cfg.params) if issubclass(spec, ImageMethod) else {}


def data_location(train: TrainConfig) -> dict[str, Any]:
    """The settings that say where the trial's data lives on this machine (folder, list files, download)."""
    keys = [k for k in (*DATA_LOCATION_KEYS, *PATH_KEYS) if k in DATA_KEYS or k in DATA_LOCATION_KEYS]
    return {k: getattr(train, k) for k in dict.fromkeys(keys) if getattr(train, k) is not None}


#: datasets decoded in this process, by what defines them (a study's trials reuse their process)
_LOADED: OrderedDict[tuple, LTData] = OrderedDict()
_LOADED_MAX = 2


def load_data(cfg: TrialConfig) -> LTData:
    """The trial's dataset: the split :data:`DATA_KEYS` define, with the method's carved sets.

    Decoded once per process and kept (the two most recent), keyed by every setting that defines it, so
    the trials of a study that run one after another in a reused Ray actor do not read and decode their
    dataset again. Nothing changes a dataset once built: loaders and methods only read it.
    """
    t = cfg.train
    keys = (*DATA_KEYS, *DATA_LOCATION_KEYS)
    settings = {k: getattr(t, k) for k in keys if k not in ("dataset", "num_workers")}
    carved = carved_sets(cfg)
    key = (t.dataset, repr(sorted(settings.items())), repr(sorted(carved.items())))
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    data = build_data(t.dataset, **settings, carved=carved)
    _LOADED[key] = data
    while len(_LOADED) > _LOADED_MAX:
        _LOADED.popitem(last=False)
    return data
