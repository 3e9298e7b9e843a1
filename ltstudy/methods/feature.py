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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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
