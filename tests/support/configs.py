"""Tiny, fast trial settings for tests."""

from __future__ import annotations

from typing import Any

from ltstudy.config import TrialConfig, resolve_config
from ltstudy.methods import get_method

#: a trial of a few seconds on 2 CPU cores: synthetic 8x8 images, 4 classes (one each many/few-shot), ResNet-32
TINY: dict[str, Any] = {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4, "imbalance": 20,
                        "val_per_class": 5, "batch_size": 64, "eval_batch_size": 256, "warmup_epochs": 0}


def tiny_config(method: str, backbone: str | None = None, **extra: Any) -> TrialConfig:
    """A CPU config of ``method`` on :data:`TINY` data (ResNet-32; feature methods on ``backbone``)."""
    values: dict[str, Any] = {**TINY, "method": method, "model": "resnet32", "device": "cpu", "epochs": 1}
    if get_method(method).stage == "feature":
        values["backbone"] = backbone
    return resolve_config({**values, **extra})


class RecordingParams:
    """Wraps a method's Params and records which declared fields the method reads."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.read = inner, set()

    def __getattr__(self, name: str) -> Any:
        if name in type(self._inner).model_fields:
            self.read.add(name)
        return getattr(self._inner, name)


def train_backbone(out: str, **extra: Any) -> str:
    """Train a one-epoch CE backbone on :data:`TINY` data (or ``extra`` settings); returns its checkpoint."""
    from ltstudy.train import TrialContext, run_trial

    run_trial(tiny_config("ce", **extra), ctx=TrialContext(checkpoint_dir=out))
    return f"{out}/checkpoint.pt"
