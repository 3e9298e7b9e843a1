"""The one epoch loop, shared by image and feature trials.

A trial body (:mod:`ltstudy.train.image`, :mod:`ltstudy.train.feature`) is a :class:`Stage`: its batches,
its update on one batch, its evaluation and its checkpoint state. :func:`run_epochs` does everything
else, the same way for both: resume from a checkpoint, reseed before every epoch, ``on_epoch_start``,
the minibatch loop, the non-finite check, the lr schedule, validation metrics every epoch, the test
metrics once after the last epoch, the checkpoint, and the report.

Reproducibility: the seed fixes the split and the initialisation, and the per-epoch reseed fixes the
sampling, augmentation and any randomness inside a method, so an epoch's result depends only on
(seed, epoch, state at its start). A run resumed from an epoch-boundary checkpoint therefore reaches the
same metrics as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ltstudy.config import TrialConfig, lr_milestones
from ltstudy.data import SPLIT_VERSION
from ltstudy.errors import NonFiniteLossError
from ltstudy.methods import Method
from ltstudy.train.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    write_progress,
)
from ltstudy.train.optim import make_optimizer, make_scheduler

#: ``report(metrics, checkpoint_dir)``: called after every epoch; ``checkpoint_dir`` is None when no
#: checkpoint was written for it
Report = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class TrialContext:
    """Where and how a trial runs: device, distributed rank, checkpoint locations."""

    device: torch.device | str | None = None
    rank: int = 0
    world_size: int = 1
    checkpoint_dir: str | None = None  # write checkpoints here (rank 0)
    resume_from: str | None = None  # a checkpoint file, or a directory holding one
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always has one
    checkpoint_epochs: frozenset[int] = frozenset()  # further epochs that get one (a scheduler's rungs)
    ready_at: float | None = None  # wall time the trial body was built (data loaded, model built)

    def checkpoint_due(self, epoch: int, epochs: int) -> bool:
        """Whether the (1-based) ``epoch`` of ``epochs`` is written to ``checkpoint_dir``."""
        return bool(self.checkpoint_dir) and self.rank == 0 and (
            epoch == epochs or epoch % max(self.checkpoint_every, 1) == 0 or epoch in self.checkpoint_epochs)


class Stage:
    """A trial's trainable state and how to drive it for one epoch; the loop does the rest.

    ``module`` is what the checkpoint stores as ``model`` and whose parameters the trial's SGD optimises
    under the trial's lr schedule; ``num_samples`` is the training set size (for the images/s figure).
    A module without a trainable parameter (a post-hoc rule) gets no optimiser and no schedule.
    """

    def __init__(self, method: Method, module: nn.Module, cfg: TrialConfig, device: torch.device,
                 num_samples: int, parameters: Iterable[nn.Parameter] | None = None) -> None:
        self.method, self.module, self.device, self.num_samples = method, module, device, num_samples
        params = list(module.parameters() if parameters is None else parameters)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if any(p.requires_grad for p in params):
            self.optimizer = make_optimizer(params, cfg.train)
            self.scheduler = make_scheduler(self.optimizer, cfg.train, lr_milestones(cfg))

    def batches(self, epoch: int) -> Iterable[Any]:
        """Put the module in training mode and return this epoch's batches."""
        raise NotImplementedError

    def step(self, batch: Any) -> torch.Tensor:
        """One update on one batch; returns the detached training loss."""
        raise NotImplementedError

    def evaluate(self, split: str) -> tuple[dict[str, Any], list[float]]:
        """Loss, top-1, many/medium/few, calibration (ECE overall and per bucket, NLL, the reliability bins)
        and per-class accuracy on ``"val"`` or ``"test"`` (``ltstudy.metrics.evaluation_metrics``)."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the epoch and the config."""
        return {"model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                "method": self.method.state_dict(), "rng": rng_state(self.device)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])


def _train_epoch(stage: Stage, epoch: int) -> float:
    """The epoch's mean training loss over every step of every rank.

    Under data parallelism the loss sum and the step count are all-reduced, so the reported loss is the
    global mean and a non-finite loss on any rank makes every rank raise together (instead of one rank
    leaving while the others wait in the next all-reduce).
    """
    total, steps = torch.zeros((), device=stage.device), 0
    for batch in stage.batches(epoch):
        total += stage.step(batch).float()
        steps += 1
    sums = torch.stack([total, torch.tensor(float(steps), device=stage.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    loss = sums[0].item() / max(sums[1].item(), 1.0)
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"training loss is {loss} in epoch {epoch + 1}")
    return loss


def run_epochs(stage: Stage, cfg: TrialConfig, ctx: TrialContext,
               report: Report | None = None) -> dict[str, Any]:
    """Train ``stage`` for the configured epochs; returns the last epoch's metrics (with test metrics)."""
    t = cfg.train
    start = 0
    state = load_checkpoint(ctx.resume_from, stage.device) if ctx.resume_from else None
    if state is not None:
        stage.load_state(state)
        start = int(state["epoch"])
    metrics: dict[str, Any] = {}
    for epoch in range(start, t.epochs):
        torch.manual_seed(t.seed * 1_000_003 + epoch)
        stage.method.on_epoch_start(epoch)
        tic = time.perf_counter()
        train_loss = _train_epoch(stage, epoch)
        seconds = time.perf_counter() - tic
        lr = stage.optimizer.param_groups[0]["lr"] if stage.optimizer is not None else 0.0
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr, "epoch_seconds": seconds,
                   "train_images_per_s": stage.num_samples / max(seconds, 1e-9)}
        if stage.scheduler is not None:
            stage.scheduler.step()
        val, val_per_class = stage.evaluate("val")
        metrics.update({f"val_{k}": v for k, v in val.items()}, val_per_class=val_per_class)
        if epoch + 1 == t.epochs:
            test, test_per_class = stage.evaluate("test")
            metrics.update({f"test_{k}": v for k, v in test.items()}, test_per_class=test_per_class)
        ckpt_dir = None
        if ctx.checkpoint_due(epoch + 1, t.epochs):
            ckpt_dir = ctx.checkpoint_dir
            save_checkpoint(Path(ckpt_dir) / CHECKPOINT_FILE, epoch=epoch + 1, config=cfg.to_dict(),
                            split_version=SPLIT_VERSION,
                            **stage.state())
            write_progress(Path(ckpt_dir), epoch + 1, metrics)
        if report is not None:
            report(dict(metrics), ckpt_dir)
    return metrics
