"""Where and how tensors are computed: the device, mixed precision, and the default optimisation step.

The lowest layer besides :mod:`ltstudy.errors`: the trainer, the methods and the feature extractor all
use it, and it imports nothing of ltstudy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) is CUDA when available, else the CPU; anything else is passed to torch."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Amp:
    """Mixed-precision settings for a step: an autocast context and an optional grad scaler."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()


NO_AMP = Amp()


def make_amp(enabled: bool, device: torch.device) -> Amp:
    """bf16 autocast on CUDA where supported, else fp16 with a grad scaler; nothing on the CPU."""
    if device.type != "cuda" or not enabled:
        return Amp(device_type=device.type)
    if torch.cuda.is_bf16_supported():
        return Amp("cuda", torch.bfloat16)
    return Amp("cuda", torch.float16, torch.amp.GradScaler("cuda"))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, amp: Amp = NO_AMP) -> torch.Tensor:
    """The default update: clear the gradients, backpropagate ``loss``, step; returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    amp.backward_step(loss, optimizer)
    return loss.detach()
