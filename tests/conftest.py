"""Shared pytest fixtures; the helpers behind them live in ``tests/support``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _checkout_state() -> set[str] | None:
    """Untracked and ignored paths of the checkout (``None`` outside git), caches left out."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored=matching", "--untracked-files=normal"],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    skip = ("__pycache__", ".pytest_cache", ".venv", ".egg-info", ".ruff_cache")
    return {line[3:] for line in out.splitlines() if not any(s in f"/{line[3:]}" for s in skip)}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout():
    """Tests write only into temporary folders: the checkout has no new file when the session ends."""
    before = _checkout_state()
    yield
    after = _checkout_state()
    if before is not None and after is not None:
        assert after <= before, f"tests wrote into the checkout: {sorted(after - before)}"


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path, monkeypatch):
    """Relative defaults (./ltstudy_results, ./mlflow.db) land in the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository (holds a 10% CIFAR-10 subset)."""
    path = REPO.parent / "shared" / "data"
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
    """A ResNet-32 trained one epoch with CE on the synthetic dataset (32 px, 10 classes)."""
    from support.configs import train_backbone

    return train_backbone(str(tmp_path_factory.mktemp("synthetic_backbone")), image_size=32,
                          synthetic_classes=10, imbalance=100, val_per_class=20, batch_size=32,
                          eval_batch_size=512, warmup_epochs=5)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A ResNet-32 trained one epoch with CE on ``support.configs.TINY`` data (8 px, 4 classes)."""
    from support.configs import train_backbone

    return train_backbone(str(tmp_path_factory.mktemp("tiny_backbone")))


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> str:
    """One feature cache root shared by the feature-stage tests (each key is extracted once)."""
    return str(tmp_path_factory.mktemp("feature_store"))
