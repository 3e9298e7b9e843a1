"""Cluster rules that a local Ray shows: ``--max-concurrent`` given on ``--resume`` replaces the limit saved
with the study (Tune restores the old one); a one-worker trial on a node that does not see the study's
storage ends at its start as a failed trial naming the node (Tune itself would find out at the first
checkpoint, after an epoch, then retry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltstudy.config import resolve_config
from ltstudy.study.run import StudyOptions, run_study

from support.configs import TINY

pytestmark = pytest.mark.slow


def _saved_limit(experiment: str) -> int:
    """The concurrency limit in the searcher state Tune saved last (what a restore starts from)."""
    from ray.tune.utils.util import _load_newest_checkpoint

    return _load_newest_checkpoint(experiment, "search_gen_state-*.json")["name:StudyConcurrency"]["max_concurrent"]


def test_max_concurrent_changes_on_resume(ray_local, tmp_path):
    opts = dict(method="ce", num_trials=1, sampler="random", scheduler="none", storage=str(tmp_path / "s"),
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", study_name="conc", retries=0, verbose=0,
                fixed={**TINY, "epochs": 1})
    first = run_study(StudyOptions(max_concurrent=1, **opts))
    assert _saved_limit(first.experiment_path) == 1
    resumed = run_study(StudyOptions(max_concurrent=3, resume=True, **opts))
    assert _saved_limit(resumed.experiment_path) == 3


def test_trial_without_the_storage_fails_at_its_start(ray_local, tmp_path):
    import ray.tune
    from ray.train._internal.session import get_session

    from ltstudy.study.trainable import Resources, make_single_worker_trial

    def on_a_node_without_the_mount(config):
        storage = get_session().storage  # Tune's marker, as a node without the shared mount sees it: absent
        Path(storage.experiment_fs_path, ".validate_storage_marker").unlink()
        make_single_worker_trial(Resources(checkpoint_every=1))(config)

    config = resolve_config({**TINY, "method": "ce", "epochs": 2}).to_dict()
    grid = ray.tune.Tuner(on_a_node_without_the_mount, param_space=config, run_config=ray.tune.RunConfig(
        storage_path=str(tmp_path), name="guard", verbose=0,
        failure_config=ray.tune.FailureConfig(max_failures=2))).fit()
    result = grid[0]
    assert result.error is None  # ended, not raised: Tune does not retry it
    assert "does not see --storage" in result.metrics["failure"]
    assert "epoch" not in result.metrics and result.metrics["training_iteration"] == 1
