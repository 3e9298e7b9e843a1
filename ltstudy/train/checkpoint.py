"""Trial checkpoints: one file, written atomically, read back onto the trial's device.

Beside ``checkpoint.pt`` a small ``progress.json`` says which epoch it holds and that epoch's scalar
metrics, so a caller can tell a finished trial from an unfinished one without loading the weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_FILE = "progress.json"


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


def write_progress(folder: Path, epoch: int, metrics: dict[str, Any]) -> None:
    """Record the checkpoint's epoch and that epoch's scalar metrics (atomically)."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tmp = folder / f".{PROGRESS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"epoch": epoch, "metrics": {k: (v if math.isfinite(v) else None)
                                                           for k, v in scalars.items()}}))
    os.replace(tmp, folder / PROGRESS_FILE)


def read_progress(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / PROGRESS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
