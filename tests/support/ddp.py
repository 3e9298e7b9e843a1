"""Data-parallel steps of ltstudy's own trainer code on several local processes (gloo on the CPU, NCCL or gloo
on CUDA), for tests that compare them with one process computing the same update by hand."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltstudy.config import TrialConfig, load_data, resolve_config
from ltstudy.data import AugmentSpec
from ltstudy.runtime import NO_AMP
from ltstudy.train.image import build_method, prepare_model
from ltstudy.train.optim import make_optimizer

#: the epoch the step belongs to (the methods' last phase: MetaSAug's meta step, FSGL's rebalanced mix)
EPOCH = 1


def epoch_seed(cfg: TrialConfig) -> int:
    """The global-RNG seed the trainer sets before an epoch (``ltstudy.train.loop.run_epochs``)."""
    return cfg.train.seed * 1_000_003 + EPOCH


def prime(method: Any, dim: int, copies: int = 1) -> None:
    """Give a MetaSAug estimator a non-zero state. Its update all-reduces sums over ranks, so each of W ranks
    passing these features once equals one process passing them ``copies = W`` times."""
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(48, dim, generator=g).abs()
    labels = torch.arange(48) % method.ctx.num_classes
    dev = method.ctx.device
    method.covariance_estimator(dim).update(torch.cat([feats] * copies).to(dev), torch.cat([labels] * copies).to(dev))


def setup(values: dict[str, Any], device: torch.device, rank: int = 0, world_size: int = 1) -> tuple:
    """(cfg, method, model, optimizer, loader) exactly as ``ImageStage`` builds them, the loader at ``EPOCH``."""
    cfg = resolve_config(values)
    t = cfg.train
    data = load_data(cfg)
    torch.manual_seed(t.seed)
    method = build_method(cfg, data, device, rank, world_size)
    model = prepare_model(method.build_model(), t, device, world_size)
    optimizer = make_optimizer(model.parameters(), t)
    loader = method.train_loader(batch_size=t.batch_size, train=True, augment=AugmentSpec.of(t),
                                 sampler=t.sampler, sampler_q=t.sampler_q, rank=rank, world_size=world_size)
    loader.set_epoch(EPOCH)
    torch.manual_seed(epoch_seed(cfg))
    method.on_epoch_start(EPOCH)
    return cfg, method, model, optimizer, loader


def _rank(rank: int, world: int, init: str, backend: str, values: dict[str, Any], device: str, out: str) -> None:
    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        cfg, method, model, optimizer, loader = setup({**values, "device": str(dev)}, dev, rank, world)
        batch = next(iter(loader))
        if cfg.method == "metasaug":
            prime(method, int(model.module.feature_dim))
            torch.manual_seed(epoch_seed(cfg))  # the step sees the RNG state the epoch starts with
        loss = method.train_step(model, batch, optimizer, NO_AMP)
        params = {k: p.detach().cpu() for k, p in model.module.named_parameters()}
        torch.save({"params": params, "loss": loss.cpu(), "method": cfg.method,
                    "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_step(values: dict[str, Any], world_size: int = 2, device: str = "cpu",
             backend: str = "gloo") -> list[dict[str, Any]]:
    """One ``train_step`` of the trial ``values`` on ``world_size`` processes; each rank's parameters after it."""
    with tempfile.TemporaryDirectory(prefix="ltstudy-ddp-") as tmp:
        init = os.path.join(tmp, "init")
        mp.spawn(_rank, args=(world_size, init, backend, values, device, tmp), nprocs=world_size, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
