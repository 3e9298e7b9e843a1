"""The method contract and the registry.

A method is one module that defines a ``Params`` model (its hyperparameters, typed, with the published
values as defaults) and a :class:`Method` subclass registered with :func:`register`. The trainer only
talks to a method through the hooks below, so a new method needs no trainer change:

* ``build_model()`` — the network (backbone + the head the method needs);
* ``on_epoch_start(epoch)`` — schedules such as deferred re-weighting;
* ``train_loader(**kw)`` — the epoch's batches (default: the standard augmented ``(x, y)`` loader);
  a method that needs other batches (two views, a second sampler) returns its own loader with the
  same ``set_epoch`` / ``__iter__`` / ``__len__`` / ``num_samples`` interface;
* ``train_step(model, batch, optimizer, amp)`` — one optimisation step on one batch of that loader
  (default: forward, ``loss``, backward, step); methods with their own update rule (SAM, meta steps)
  override it;
* ``predict(model, x)`` — test-time logits;
* ``state_dict()`` / ``load_state_dict()`` — method state that a checkpoint must carry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ltstudy.errors import ConfigError
from ltstudy.models import build_model


class Params(BaseModel):
    """Base of every method's hyperparameters: typed, immutable, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


@dataclass
class Amp:
    """Mixed-precision settings for a step: an autocast context and an optional grad scaler."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


@dataclass
class MethodContext:
    """What a method may know about the trial it runs in."""

    num_classes: int
    class_counts: torch.Tensor  # int64 (C,) training counts, on ``device``
    epochs: int
    device: torch.device
    model_name: str
    train: Any = None  # the resolved TrainConfig
    data: Any = None  # the LTData, for methods that need extra loaders (second sampler, meta set)
    make_loader: Callable[..., Any] | None = None
    rank: int = 0
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class with the default (plain supervised) behaviour of every hook."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]]
    #: published training recipe: overrides of TrainConfig defaults (lr, schedule, epochs, ...)
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: "end_to_end" methods train the network; "feature" methods work on cached backbone features
    stage: ClassVar[Literal["end_to_end", "feature"]] = "end_to_end"
    head: ClassVar[str] = "linear"

    def __init__(self, params: Params, ctx: MethodContext) -> None:
        self.p = params
        self.ctx = ctx

    def build_model(self) -> nn.Module:
        return build_model(self.ctx.model_name, self.ctx.num_classes, head=self.head)

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_loader(self, **kw: Any) -> Any:
        """The training batches; ``kw`` are the trainer's ``make_loader`` arguments."""
        assert self.ctx.make_loader is not None
        return self.ctx.make_loader("train", **kw)

    def train_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                   amp: Amp) -> torch.Tensor:
        """One update on one batch of :meth:`train_loader`; returns the detached training loss."""
        x, y = batch
        with amp.autocast():
            loss = self.loss(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        amp.backward_step(loss, optimizer)
        return loss.detach()

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def state_dict(self) -> dict[str, Any]:
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
