"""Trial checkpoints: one file, written atomically, read back onto the trial's device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
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
    """The checkpoint in ``where`` (a file, or a folder holding ``checkpoint.pt``), or None."""
    path = Path(where)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)
