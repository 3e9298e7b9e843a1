"""A one-worker trial on a node that does not see the study's storage ends at its start as a failed trial
naming the node (Tune itself would find out at the first checkpoint, after an epoch, then retry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltstudy.config import resolve_config

from .conftest import TINY

pytestmark = pytest.mark.slow


def test_trial_without_the_storage_fails_at_its_start(ray_local, tmp_path):
    import ray.tune
    from ray.train._internal.session import get_session

    from ltstudy.study.runner import single_worker_trial

    def on_a_node_without_the_mount(config):
        storage = get_session().storage  # Tune's marker, as a node without the shared mount sees it: absent
        Path(storage.experiment_fs_path, ".validate_storage_marker").unlink()
        single_worker_trial(config)

    config = resolve_config({**TINY, "method": "ce", "epochs": 2}).to_dict()
    grid = ray.tune.Tuner(on_a_node_without_the_mount, param_space=config, run_config=ray.tune.RunConfig(
        storage_path=str(tmp_path), name="guard", verbose=0,
        failure_config=ray.tune.FailureConfig(max_failures=2))).fit()
    result = grid[0]
    assert result.error is None  # ended, not raised: Tune does not retry it
    assert "does not see --storage" in result.metrics["failure"]
    assert "epoch" not in result.metrics and result.metrics["training_iteration"] == 1
