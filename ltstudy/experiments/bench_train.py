"""Benchmarks behind ``ltstudy bench``: whole-loop throughput and peak memory on the current device.

Figures are medians over repeats of the real training step (the method's ``train_step`` with the batch
augmentation and the device-resident loader) and of the evaluation forward pass, so they include
augmentation and data movement, not just the model.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import torch

from ltstudy.config import load_data, resolve_config
from ltstudy.data import AugmentSpec, make_loader
from ltstudy.runtime import make_amp, resolve_device
from ltstudy.train.image import build_method, model_preprocess, prepare_model
from ltstudy.train.optim import make_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _timed(loop: Any, steps: int, batch: int, device: torch.device) -> float:
    _sync(device)
    tic = time.perf_counter()
    loop(steps)
    _sync(device)
    return steps * batch / (time.perf_counter() - tic)


def bench_train(method: str = "ce", model: str = "resnet32", batch_size: int = 128, steps: int = 30,
                repeats: int = 5, device: str = "auto", compile: bool = False, **overrides: Any) -> dict[str, Any]:
    """Median train and eval images/s and peak memory of ``method`` on synthetic CIFAR-sized data;
    ``compile``: the network under ``torch.compile`` (the warm-up then includes the compilation; a
    measurement only, trials do not compile: docs/benchmarks.md says why)."""
    dev = resolve_device(device)
    cfg = resolve_config({"method": method, "model": model, "dataset": "synthetic", "image_size": 32,
                          "batch_size": batch_size, "device": str(dev), **overrides})
    t = cfg.train
    data = load_data(cfg)
    torch.manual_seed(0)
    meth = build_method(cfg, data, dev)
    # time the last phase of the schedule: deferred phases (DRW, MetaSAug's meta step) are the costly ones
    meth.on_epoch_start(t.epochs - 1)
    net = prepare_model(meth.build_model(), t, dev, 1)
    if compile:
        net = torch.compile(net)
    opt = make_optimizer(net.parameters(), t)
    amp = make_amp(t.amp, dev)
    cl = dev.type == "cuda" and t.channels_last
    pre = model_preprocess(net, t, meth)  # a timm / open_clip model's side and statistics
    extra = {"preprocess": pre} if pre is not None else {}
    loader = meth.train_loader(batch_size=batch_size, train=True, augment=AugmentSpec(),
                               channels_last=cl, **extra)

    def batches() -> Any:
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    eval_batch = next(iter(make_loader(data, "train", batch_size=batch_size, device=dev,
                                       train=False, channels_last=cl, **extra)))[0]

    def train_steps(n: int) -> None:
        net.train()
        for _ in range(n):
            meth.train_step(net, next(stream), opt, amp)

    @torch.no_grad()
    def eval_steps(n: int) -> None:
        net.eval()
        for _ in range(n):
            x = eval_batch
            with amp.autocast():
                net(x)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    train_steps(3)  # warm-up: allocator, cudnn autotune
    train = [_timed(train_steps, steps, batch_size, dev) for _ in range(repeats)]
    evals = [_timed(eval_steps, steps, batch_size, dev) for _ in range(repeats)]
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "train_images_per_s": statistics.median(train),
            "eval_images_per_s": statistics.median(evals),
            "peak_memory_mib": _peak_memory_mib(dev)}
