"""The one trial loop: ``run_trial(cfg, report) -> metrics``.

Pure torch: no Ray, no MLflow. Callers (the CLI, the Ray Tune/Train adapters, tests, notebooks) pass a
``report`` callback that receives each epoch's metrics and, when one was written, the directory of the
checkpoint for that epoch. Studies select on the ``val_*`` metrics; the test split is evaluated once,
after the last epoch, and only reported.

Reproducibility: the seed fixes the split, the initialisation, and — through a per-epoch reseed — the
sampling, augmentation and any randomness inside a method, so an epoch's result depends only on
(seed, epoch, state at its start). A run resumed from an epoch-boundary checkpoint therefore reaches
the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ltstudy.config import TrialConfig
from ltstudy.data import AugmentSpec, LTData, build_data, make_loader
from ltstudy.methods import Amp, Method, MethodContext, get_method
from ltstudy.metrics import accuracy_metrics

CHECKPOINT_FILE = "checkpoint.pt"
Report = Callable[[dict[str, Any], "str | None"], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial is a failure, not a result."""


@dataclass
class TrialContext:
    """Where and how a trial runs: device, distributed rank, checkpoint locations."""

    device: torch.device | str | None = None
    rank: int = 0
    world_size: int = 1
    checkpoint_dir: str | None = None  # write a checkpoint here after every epoch (rank 0)
    resume_from: str | None = None  # a checkpoint file, or a directory holding one


def resolve_device(name: str | torch.device | None) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def load_data(cfg: TrialConfig) -> LTData:
    t = cfg.train
    return build_data(
        t.dataset, data_root=t.data_root, download=t.download, imbalance=t.imbalance,
        profile=t.profile, val_per_class=t.val_per_class, seed=t.seed, train_list=t.train_list,
        val_list=t.val_list, test_list=t.test_list, image_size=t.image_size,
        synthetic_classes=t.synthetic_classes,
    )


def build_method(cfg: TrialConfig, data: LTData, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> Method:
    t = cfg.train

    def loader(split: str, **kw: Any) -> Any:
        kw.setdefault("device", device)
        kw.setdefault("seed", t.seed)
        return make_loader(data, split, **kw)

    ctx = MethodContext(
        num_classes=data.num_classes, class_counts=data.class_counts.to(device), epochs=t.epochs,
        device=device, model_name=t.model, train=t, data=data, make_loader=loader, rank=rank,
        world_size=world_size,
    )
    return get_method(t.method)(cfg.params, ctx)


def _amp(cfg: Any, device: torch.device) -> Amp:
    if device.type != "cuda" or not cfg.amp:
        return Amp(device_type=device.type)
    if torch.cuda.is_bf16_supported():
        return Amp("cuda", torch.bfloat16)
    return Amp("cuda", torch.float16, torch.amp.GradScaler("cuda"))


@torch.no_grad()
def evaluate(method: Method, model: nn.Module, loader: Any, data: LTData, cfg: Any,
             amp: Amp) -> tuple[dict[str, float], list[float]]:
    """Loss, top-1, many/medium/few and per-class accuracy of ``model`` on one split."""
    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    for x, y in loader:
        with amp.autocast():
            logits = method.predict(model, x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(1))
        labels.append(y)
    pred, lab = torch.cat(preds), torch.cat(labels)
    metrics, per_class = accuracy_metrics(
        pred, lab, data.class_counts, cfg.many_threshold, cfg.few_threshold
    )
    metrics["loss"] = loss_sum / max(len(lab), 1)
    return metrics, per_class


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(where: str | Path, device: torch.device) -> dict[str, Any] | None:
    path = Path(where)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def _prepare_model(method: Method, cfg: Any, device: torch.device, world_size: int) -> nn.Module:
    model = method.build_model().to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


def _optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


def _train_epoch(method: Method, model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                 amp: Amp, epoch: int) -> float:
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    steps = 0
    for batch in loader:
        total += method.train_step(model, batch, optimizer, amp).float()
        steps += 1
    loss = total.item() / max(steps, 1)
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"training loss is {loss} in epoch {epoch + 1}")
    return loss


def run_trial(cfg: TrialConfig, report: Report | None = None,
              ctx: TrialContext | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the last epoch's metrics (with test metrics)."""
    if get_method(cfg.method).stage == "feature":  # classifier stage on cached backbone features
        from ltstudy.feature_train import run_feature_trial
        return run_feature_trial(cfg, report, ctx)
    ctx = ctx or TrialContext()
    t = cfg.train
    device = resolve_device(ctx.device if ctx.device is not None else t.device)
    data = load_data(cfg)
    torch.manual_seed(t.seed)
    method = build_method(cfg, data, device, ctx.rank, ctx.world_size)
    model = _prepare_model(method, t, device, ctx.world_size)
    optimizer = _optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, t))
    amp = _amp(t, device)
    channels_last = device.type == "cuda" and t.channels_last
    augment = AugmentSpec(crop_padding=t.crop_padding, flip=t.flip, cutout=t.cutout,
                          autoaugment=t.autoaugment)
    train_loader = method.train_loader(
        batch_size=t.batch_size, train=True, augment=augment, sampler=t.sampler,
        sampler_q=t.sampler_q, rank=ctx.rank, world_size=ctx.world_size,
        channels_last=channels_last, num_workers=t.num_workers,
    )
    eval_kw = dict(batch_size=t.eval_batch_size, device=device, train=False,
                   channels_last=channels_last, num_workers=t.num_workers)
    val_loader = make_loader(data, "val", **eval_kw)

    start = 0
    state = load_checkpoint(ctx.resume_from, device) if ctx.resume_from else None
    if state is not None:
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state["method"])
        if amp.scaler is not None and "scaler" in state:
            amp.scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])

    metrics: dict[str, Any] = {}
    for epoch in range(start, t.epochs):
        torch.manual_seed(t.seed * 1_000_003 + epoch)
        method.on_epoch_start(epoch)
        train_loader.set_epoch(epoch)
        tic = time.perf_counter()
        train_loss = _train_epoch(method, model, train_loader, optimizer, amp, epoch)
        seconds = time.perf_counter() - tic
        metrics = {"epoch": epoch + 1, "train_loss": train_loss,
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
                   "train_images_per_s": train_loader.num_samples / max(seconds, 1e-9)}
        scheduler.step()
        val, val_per_class = evaluate(method, model, val_loader, data, t, amp)
        metrics.update({f"val_{k}": v for k, v in val.items()}, val_per_class=val_per_class)
        if epoch + 1 == t.epochs:
            test, test_per_class = evaluate(method, model, make_loader(data, "test", **eval_kw),
                                            data, t, amp)
            metrics.update({f"test_{k}": v for k, v in test.items()}, test_per_class=test_per_class)
        ckpt_dir = None
        if ctx.checkpoint_dir and ctx.rank == 0:
            ckpt_dir = ctx.checkpoint_dir
            save_checkpoint(
                Path(ckpt_dir) / CHECKPOINT_FILE, epoch=epoch + 1, model=_unwrap(model).state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                method=method.state_dict(), rng=_rng_state(device), config=cfg.to_dict(),
                **({"scaler": amp.scaler.state_dict()} if amp.scaler is not None else {}),
            )
        if report is not None:
            report(dict(metrics), ckpt_dir)
    return metrics


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
