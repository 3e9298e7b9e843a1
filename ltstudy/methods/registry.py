"""What every method has, and the registry that finds a method by name.

A method is one module defining a ``Params`` model (its hyperparameters, typed, with the published values
as defaults) and a class registered with :func:`register`, derived from one of the two contracts:
:class:`ltstudy.methods.image.ImageMethod` (trains the network on images) or
:class:`ltstudy.methods.feature.FeatureMethod` (trains a classifier on cached backbone features). This
module holds only what both share: identity, the hyperparameters (``self.p``), the published recipes
(one per dataset family, :class:`Recipe`), the trial context, the per-epoch hook and checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ltstudy.data import FAMILIES
from ltstudy.errors import ConfigError


class Params(BaseModel):
    """Base of every method's hyperparameters: typed, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


@dataclass(frozen=True)
class Recipe:
    """A method's published settings for one dataset family, and where they come from.

    ``settings`` mixes training settings (``TrainConfig`` fields: lr, epochs, model, ...) and the method's
    hyperparameters; ``by_imbalance`` holds values a reference publishes for one imbalance factor only
    (TailCalibX's CIFAR-100-LT IF 50 and IF 10 commands), applied on top of ``settings`` at that IF.
    """

    settings: dict[str, Any]
    source: str
    by_imbalance: dict[float, dict[str, Any]] = field(default_factory=dict)

    def resolved(self, imbalance: float | None = None) -> dict[str, Any]:
        """The settings at one imbalance factor."""
        extra = self.by_imbalance.get(float(imbalance), {}) if imbalance is not None else {}
        return {**self.settings, **extra}


@dataclass
class MethodContext:
    """What a method may know about the trial it runs in."""

    num_classes: int
    class_counts: torch.Tensor  # int64 (C,) training counts, on ``device``
    epochs: int
    device: torch.device
    model_name: str
    train: Any = None  # the resolved TrainConfig
    data: Any = None  # image methods: the LTData (extra loaders, carved sets such as MetaSAug's meta set)
    make_loader: Callable[..., Any] | None = None  # image methods: ``make_loader(split, **kw)``
    rank: int = 0
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    #: ``ltstudy.models.build_backbone``'s options for a timm / open_clip model (weights, constructor kwargs)
    model_options: dict[str, Any] = field(default_factory=dict)


class Method:
    """Identity, hyperparameters and state: the part of a method the trainer, the CLI and studies share.

    Subclass :class:`~ltstudy.methods.image.ImageMethod` or :class:`~ltstudy.methods.feature.FeatureMethod`,
    never this class directly. Hyperparameters are read from ``self.p`` (the validated ``Params``) and
    nowhere else.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]]
    #: the published recipe of each dataset family (``ltstudy.data.FAMILIES``): training settings and
    #: hyperparameters that override the ``TrainConfig`` and ``Params`` defaults; every family is declared
    recipes: ClassVar[dict[str, Recipe]] = {}
    #: "end_to_end" methods train the network; "feature" methods work on cached backbone features
    stage: ClassVar[Literal["end_to_end", "feature"]]

    def __init__(self, params: Params, ctx: MethodContext) -> None:
        self.p = params
        self.ctx = ctx

    @classmethod
    def phase_epochs(cls, params: Params, epochs: int) -> list[int]:
        """0-based epochs where the method's own schedule changes phase (DRW, a meta phase).

        Studies never stop a trial early before the last phase has begun (``ltstudy.study.search.schedulers``);
        the lr schedule's own milestones are added by the trainer (``ltstudy.train.optim``).
        """
        return []

    @classmethod
    def recipe(cls, family: str) -> Recipe:
        """The published recipe of a dataset family (see ``ltstudy methods --dataset``)."""
        try:
            return cls.recipes[family]
        except KeyError:
            raise ConfigError(f"method {cls.name!r} declares no recipe for dataset family {family!r}") from None

    @classmethod
    def check(cls, train: Any, params: Params) -> None:
        """Raise :class:`ConfigError` when a resolved config cannot run (a setting the method needs is
        missing); called before a trial, or a study, starts."""

    @classmethod
    def lr_milestones(cls, params: Params) -> tuple[float, ...] | None:
        """Step-schedule milestones tied to a phase switch of the method (None: not tied).

        Used when the trial leaves ``milestones`` unset, so a study that moves the switch moves the lr
        decay with it, as the references tie them (LDAM-DRW and MetaSAug decay at the switch, 160 of 200,
        and again at 180).
        """
        return None

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based), after the trainer reseeded the global RNG for it."""

    def state_dict(self) -> dict[str, Any]:
        """Method state a checkpoint must carry (beyond the model and optimiser)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


_REGISTRY: dict[str, type[Method]] = {}
#: families whose recipe is another family's when a method's reference publishes none for them (the
#: recipe's source says so): Places-LT and iNaturalist 2018 fall back to the ImageNet-LT recipe
FALLBACK_FAMILY = {"places": "imagenet", "inat": "imagenet"}


def _with_fallbacks(cls: type[Method]) -> dict[str, Recipe]:
    recipes = dict(cls.recipes)
    for family, base in FALLBACK_FAMILY.items():
        if family not in recipes and base in recipes:
            b = recipes[base]
            recipes[family] = Recipe(b.settings, f"no {FAMILIES[family]} recipe in the reference; its "
                                                 f"{FAMILIES[base].split(' (')[0]} one: {b.source}", b.by_imbalance)
    return recipes


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``.

    Every dataset family needs a recipe (its keys are checked against the training settings and ``Params``
    when a config resolves, and by the contract tests); a family of :data:`FALLBACK_FAMILY` the method does
    not declare gets the recipe of the family it falls back to, with a source that says so.
    """
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    cls.recipes = _with_fallbacks(cls)
    missing = [f for f in FAMILIES if f not in cls.recipes]
    if missing:
        raise ValueError(f"method {cls.name!r} declares no recipe for {', '.join(missing)}")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def iter_hyperparameters(name: str) -> Iterator[tuple[str, str, Any, str]]:
    """(name, type, default, description) for each declared hyperparameter of a method."""
    for key, info in get_method(name).Params.model_fields.items():
        kind = getattr(info.annotation, "__name__", str(info.annotation))
        yield key, kind, info.default, info.description or ""
