"""The optimiser and the learning-rate schedule every trial uses (SGD; warm-up, then step/cosine/constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """SGD with the trial's lr, momentum, weight decay and Nesterov setting."""
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(epoch: int, cfg: Any) -> float:
    """Multiplier of the base lr for a 0-based epoch: linear warm-up, then step/cosine/constant."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    if cfg.schedule == "step":
        passed = sum(epoch >= int(m * cfg.epochs) for m in cfg.milestones)
        return cfg.gamma**passed
    return 1.0


def lr_phase_epochs(cfg: Any) -> list[int]:
    """0-based epochs where the lr schedule changes phase: the end of warm-up and the step milestones."""
    phases = [cfg.warmup_epochs] if 0 < cfg.warmup_epochs < cfg.epochs else []
    if cfg.schedule == "step":
        phases += [int(m * cfg.epochs) for m in cfg.milestones if 0 < int(m * cfg.epochs) < cfg.epochs]
    return sorted(set(phases))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch schedule of :func:`lr_factor`, stepped once after each epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg))
