"""What every method has, and the registry that finds a method by name.

A method is one module defining a ``Params`` model (its hyperparameters, typed, with the published values
as defaults) and a class registered with :func:`register`, derived from one of the two contracts:
:class:`ltstudy.methods.image.ImageMethod` (trains the network on images) or
:class:`ltstudy.methods.feature.FeatureMethod` (trains a classifier on cached backbone features). This
module holds only what both share: identity, the hyperparameters (``self.p``), the trial context, the
per-epoch hook and checkpointed state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ltstudy.errors import ConfigError


class Params(BaseModel):
    """Base of every method's hyperparameters: typed, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


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


class Method:
    """Identity, hyperparameters and state: the part of a method the trainer, the CLI and studies share.

    Subclass :class:`~ltstudy.methods.image.ImageMethod` or :class:`~ltstudy.methods.feature.FeatureMethod`,
    never this class directly. Hyperparameters are read from ``self.p`` (the validated ``Params``) and
    nowhere else.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]]
    #: published training recipe: overrides of TrainConfig defaults (lr, schedule, epochs, ...)
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: "end_to_end" methods train the network; "feature" methods work on cached backbone features
    stage: ClassVar[Literal["end_to_end", "feature"]]

    def __init__(self, params: Params, ctx: MethodContext) -> None:
        self.p = params
        self.ctx = ctx

    @classmethod
    def phase_epochs(cls, params: Params, epochs: int) -> list[int]:
        """0-based epochs where the method's own schedule changes phase (DRW, a meta phase).

        Studies never stop a trial early before the last phase has begun (``ltstudy.study.schedulers``);
        the lr schedule's own milestones are added by the trainer (``ltstudy.train.optim``).
        """
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based), after the trainer reseeded the global RNG for it."""

    def state_dict(self) -> dict[str, Any]:
        """Method state a checkpoint must carry (beyond the model and optimiser)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
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
