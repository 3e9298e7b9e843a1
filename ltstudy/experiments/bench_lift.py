"""``ltstudy bench lift``: what LIFT costs — training and evaluation images/s, seconds per epoch, the share of
parameters it trains — measured on the trainer's own trial body at a reduced size.

The network has the shape of the model named (default ``open_clip:ViT-B-16``, LIFT's CLIP ViT-B/16 at 224 px)
with random weights (``pretrained=none``: nothing is downloaded, and the cost does not depend on the
weights' values), built by the ``lift`` method with its published options (AdaptFormer of LIFT's width, the
text-initialised cosine head, the LA loss, SGD), on synthetic 32-px images of 100 classes (CIFAR-100-LT's
shape, so the adapter width and the head are CIFAR-100's) that the loader resizes on the device to the
model's side, as it does CIFAR. Timed: ``steps`` training steps (the trial's loader, random
resized crop, forward, loss, backward, update) after one warm-up step, and the same number of evaluation
batches with and without the five-crop test-time ensemble; medians of ``repeats``. The seconds per epoch
are the training rate scaled to CIFAR-100-LT IF 100's 10,847 training images and the evaluation rate to
its 10,000 test images: the one extrapolation here, said so in the table. On CUDA the trainer runs bf16
autocast and channels-last, as trials do.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from ltstudy.config import resolve_config
from ltstudy.data import make_loader
from ltstudy.models.adapters import trained_share
from ltstudy.runtime import resolve_device
from ltstudy.train import TrialContext
from ltstudy.train.image import ImageStage

#: CIFAR-100-LT IF 100: the papers' training images and the balanced test set
CIFAR100_LT_TRAIN, CIFAR100_TEST = 10_847, 10_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_lift(model: str = "open_clip:ViT-B-16", batch_size: int = 16, steps: int = 3, repeats: int = 3,
               device: str = "auto", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """LIFT's cost at ``model``'s shape; see the module docstring."""
    dev = resolve_device(device)
    # CIFAR-100-LT's shape: 100 classes (LIFT's AdaptFormer width 4 and a 100-row head), 32-px images
    values = {"method": "lift", "dataset": "synthetic", "synthetic_classes": 100, "imbalance": 100,
              "image_size": 32, "model": model, "pretrained": "none", "batch_size": batch_size,
              "eval_batch_size": batch_size, "device": str(dev), "crop_padding": 0, "random_resized_crop": True,
              **(overrides or {})}
    cfg = resolve_config(values)
    tic = time.perf_counter()
    stage = ImageStage(cfg, TrialContext(), dev)
    build_s = time.perf_counter() - tic
    trained, total = trained_share(stage.module)

    def batches():
        epoch = 0
        while True:
            yield from stage.batches(epoch)
            epoch += 1

    stream = batches()
    stage.step(next(stream))  # warm-up: allocator, kernels

    def train_rate() -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            stage.step(next(stream))
        _sync(dev)
        return steps * batch_size / (time.perf_counter() - t0)

    train = [train_rate() for _ in range(repeats)]
    rates = {}
    pre = stage.eval_kw.get("preprocess")
    for label, crops in (("single", 1), ("tte", 5)):
        kw = {**stage.eval_kw, "preprocess": replace(pre, eval_crops=crops)}
        views, _ = _first(make_loader(stage.data, "train", **kw))
        stage.model.eval()

        @torch.no_grad()
        def eval_rate(v=views) -> float:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                with stage.amp.autocast():
                    torch.stack([stage.model(x).float() for x in v]).mean(0)
            _sync(dev)
            return steps * len(v[0]) / (time.perf_counter() - t0)

        rates[label] = statistics.median(eval_rate() for _ in range(repeats))
    rate = statistics.median(train)
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            f"cpu, {torch.get_num_threads()} threads", "model": model, "side": pre.size, "batch_size": batch_size,
            "train_images_per_s": rate, "eval_images_per_s": rates["single"],
            "eval_tte_images_per_s": rates["tte"], "epoch_seconds": CIFAR100_LT_TRAIN / rate,
            "test_seconds": CIFAR100_TEST / rates["single"], "test_tte_seconds": CIFAR100_TEST / rates["tte"],
            "trained_parameters": trained, "parameters": total, "trained_share": trained / total,
            "build_seconds": build_s, "amp": stage.amp.dtype is not None}


def _first(loader: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    *views, y = next(iter(loader))
    return views, y
