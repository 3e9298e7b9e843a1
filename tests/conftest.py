"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository (holds a 10% CIFAR-10 subset)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.fail(f"the tests need the shared CIFAR-10 subset at {path} (the repository sits beside shared/)")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread: torch's default threads collapse when other processes load the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- feature stage ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_backbone(tmp_path_factory) -> str:
    """A ResNet-32 trained one epoch with CE on the synthetic dataset (32 px), for feature tests."""
    from ltstudy.config import resolve_config
    from ltstudy.train import TrialContext, run_trial

    out = tmp_path_factory.mktemp("synthetic_backbone")
    cfg = resolve_config({"method": "ce", "dataset": "synthetic", "image_size": 32, "epochs": 1,
                          "batch_size": 32, "device": "cpu"})
    run_trial(cfg, ctx=TrialContext(checkpoint_dir=str(out)))
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> str:
    """One feature cache root shared by the feature-stage tests (each key is extracted once)."""
    return str(tmp_path_factory.mktemp("feature_store"))
