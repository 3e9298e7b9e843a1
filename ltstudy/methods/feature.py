"""The contract of feature methods (``stage = "feature"``): classifiers trained on cached backbone features.

A feature method never sees images. The trainer (:mod:`ltstudy.train.feature`) loads the cached features
(``ltstudy.features``) into a :class:`FeatureSet` of device tensors, calls :meth:`FeatureMethod.prepare`
once, optimises the parameters of :meth:`FeatureMethod.classifier` with the trial's optimiser and lr
schedule, and each epoch calls ``on_epoch_start(epoch)`` and then, for every batch of
:meth:`FeatureMethod.batches`, :func:`ltstudy.runtime.optimizer_step` on :meth:`FeatureMethod.batch_loss`.
The minibatch loop itself is the trainer's, shared with image methods.

========================= ===================================================== =============================
hook                      default                                               methods that override it
========================= ===================================================== =============================
``prepare(feats)``        keep ``feats``                                        all
``classifier()``          none (required)                                       all
``batch_loss(batch)``     none (required)                                       all
``batches(epoch)``        train-row index batches, on-device ``randperm``       ce_classifier, tailcalibx,
                                                                                dlsa, fsa
``logits(split)``         ``classifier()(x)`` on the cached val / test features tailcalibx, dlsa
``on_epoch_start``        nothing                                               tailcalibx
``extract_options(p)``    no maps, no augmented views                           tailcalibx, fsa
``state_dict()``          empty                                                 dlsa
========================= ===================================================== =============================

Post-hoc rules (:class:`PostHocMethod`: ``tau_norm``, ``logit_adjust_posthoc``) rewrite the logits of the
backbone's trained classifier; they choose their strength in ``prepare`` (on the validation split, or fixed),
have ``post_hoc = True`` and no trainable parameter: the trainer runs their epochs without an optimiser.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ltstudy.errors import ConfigError
from ltstudy.methods.registry import Method, Params


@dataclass
class FeatureSet:
    """Cached backbone features of one dataset, as tensors on the trial's device."""

    train_x: torch.Tensor  # (N, D) float32, eval-transform view
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_counts: torch.Tensor  # (C,) int64 training counts
    head: nn.Module | None = None  # the backbone's own classifier (frozen copy)
    head_type: str = "linear"
    train_maps: torch.Tensor | None = None  # (N, C_map, H, W) last-stage maps of train_x's rows
    train_views: list[torch.Tensor] | None = None  # augmented passes, each (N, D), rows as train_x

    @property
    def feature_dim(self) -> int:
        return int(self.train_x.shape[1])


def minibatches(n: int, batch_size: int, device: torch.device, steps: int | None = None,
                weights: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Index batches of an epoch: a device ``randperm`` (or weighted draws), no per-row Python.

    ``steps`` caps the number of batches; with ``weights`` indices are drawn with replacement
    (class-balanced and similar re-sampling), ``steps`` defaulting to ``ceil(n / batch_size)``.
    """
    if n == 0:
        return
    if weights is not None:
        total = steps if steps is not None else -(-n // batch_size)
        order = torch.multinomial(weights, total * batch_size, replacement=True)
    else:
        order = torch.randperm(n, device=device)
    for count, start in enumerate(range(0, len(order), batch_size)):
        if steps is not None and count >= steps:
            return
        yield order[start:start + batch_size]


class FeatureMethod(Method):
    """Base of the feature methods; see the module docstring for the hooks and who uses them."""

    stage = "feature"
    #: a post-hoc rule on the backbone's classifier (:class:`PostHocMethod`): nothing to optimise, so the
    #: trainer builds no optimiser and runs no step
    post_hoc: ClassVar[bool] = False

    @classmethod
    def extract_options(cls, params: Params) -> dict[str, Any]:
        """What the feature cache must hold for this method."""
        return {"fmaps": False, "augmented_views": 0}

    def prepare(self, feats: FeatureSet) -> None:
        """One-time work before the first epoch (class statistics, flows, confusion matrices)."""
        self.feats = feats

    def classifier(self) -> nn.Module:
        """The trainable module: the trainer optimises its parameters and checkpoints its state."""
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterable[Any]:
        """This epoch's batches, each one argument of :meth:`batch_loss` (default: train-row indices)."""
        return minibatches(len(self.feats.train_y), self.ctx.train.batch_size, self.feats.train_x.device)

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of one batch (a 0-d tensor with a graph)."""
        raise NotImplementedError

    def logits(self, split: str) -> torch.Tensor:
        """(N, C) logits of the cached ``"val"`` or ``"test"`` features."""
        x = self.feats.val_x if split == "val" else self.feats.test_x
        return self.classifier()(x)


# ------------------------------------------------------------------------------------------ post hoc
def tau_grid(tau_max: float, step: float) -> list[float]:
    n = int(round(tau_max / step))
    return [round(i * step, 10) for i in range(n + 1)]


def best_on_validation(logits_of: Any, grid: list[float], y: torch.Tensor) -> float:
    """The grid value whose logits are most accurate on the (balanced) validation split; ties: the smallest."""
    best, best_acc = grid[0], -1.0
    for value in grid:
        acc = (logits_of(value).argmax(1) == y).double().mean().item() if len(y) else 0.0
        if acc > best_acc + 1e-12:
            best, best_acc = value, acc
    return best


class FrozenHead(nn.Module):
    """A trained classifier, frozen, and the post-hoc rule that computes logits from it: ``rule(x)``."""

    def __init__(self, head: nn.Module, rule: Any) -> None:
        super().__init__()
        self.head = head.requires_grad_(False)
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule(x)


class SelectParams(Params):
    """A post-hoc rule's strength: chosen on validation, or fixed."""

    select: Literal["validation", "fixed"] = Field(
        "validation", description="validation: the best tau of the grid 0, tau_step, ..., tau_max on the "
                                  "validation split; fixed: tau as given")
    tau: float = Field(1.0, ge=0.0, description="the rule's tau when select=fixed")
    tau_max: float = Field(2.0, gt=0.0, description="top of the validation grid")
    tau_step: float = Field(0.1, gt=0.0, description="step of the validation grid")


class PostHocMethod(FeatureMethod):
    """A rule applied to the backbone's trained classifier: no parameters to train (the trainer runs no step),
    the rule's τ chosen in :meth:`prepare` on the validation split or fixed."""

    post_hoc: ClassVar[bool] = True
    #: the head types the rule applies to
    heads: tuple[str, ...] = ("linear", "normed", "cosine", "scaled_cosine")

    def rule(self, tau: float) -> Any:
        """The logits of features ``x`` under the rule at strength ``tau``: a function ``x -> logits``."""
        raise NotImplementedError

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        if feats.head is None:
            raise ConfigError(f"{self.name} adjusts a trained classifier, and the feature cache holds none (a "
                              "pretrained backbone's cache has no classifier of this dataset): use a trained "
                              "backbone=CHECKPOINT")
        if feats.head_type not in self.heads:
            raise ConfigError(f"{self.name} applies to a {' or '.join(self.heads)} classifier; the backbone's is "
                              f"{feats.head_type!r}")
        grid = tau_grid(self.p.tau_max, self.p.tau_step)
        fixed = self.p.tau
        if self.p.select == "validation":
            with torch.no_grad():
                self.tau = best_on_validation(lambda t: self.rule(t)(feats.val_x), grid, feats.val_y)
        else:
            self.tau = fixed
        self.module = FrozenHead(feats.head, self.rule(self.tau))

    def classifier(self) -> nn.Module:
        return self.module

    def batches(self, epoch: int) -> Iterable[Any]:
        return ()  # nothing to train

    def batch_loss(self, batch: Any) -> torch.Tensor:
        raise RuntimeError(f"{self.name} trains nothing")

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = float(state["tau"])
        self.module.rule = self.rule(self.tau)
