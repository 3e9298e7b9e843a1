"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository (holds a 10% CIFAR-10 subset)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.skip(f"shared CIFAR-10 subset not found under {path}")
    return path
