"""The contract of feature-stage methods (``stage = "feature"``).

A feature-stage method never sees images: ``ltstudy.feature_train.run_feature_trial`` loads the cached
backbone features (``ltstudy.features``) into a :class:`FeatureSet` of device tensors and drives these
hooks, in order:

* ``extract_options(params)`` (classmethod) — what the cache must hold (feature maps, augmented views);
* ``prepare(feats)`` — one-time work before the classifier epochs (class statistics, flows, confusion);
* ``classifier()`` — the trainable module; the trainer builds the optimizer (TrainConfig lr, momentum,
  weight decay; override ``make_optimizer``) and the lr schedule over it;
* ``train_epoch(epoch, optimizer)`` — one epoch of minibatches drawn with on-device ``randperm``;
  returns the mean loss as a 0-d tensor;
* ``logits(split)`` — (N, C) logits of the cached ``"val"`` / ``"test"`` features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ltstudy.methods.base import Method


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
    """Base of the feature-stage methods; see the module docstring for the hooks."""

    stage = "feature"

    @classmethod
    def extract_options(cls, params: Any) -> dict[str, Any]:
        """What the feature cache must hold for this method."""
        return {"fmaps": False, "augmented_views": 0}

    def prepare(self, feats: FeatureSet) -> None:
        self.feats = feats

    def classifier(self) -> nn.Module:
        raise NotImplementedError

    def make_optimizer(self, module: nn.Module, cfg: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, split: str) -> torch.Tensor:
        x = self.feats.val_x if split == "val" else self.feats.test_x
        return self.classifier()(x)

    @staticmethod
    def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
