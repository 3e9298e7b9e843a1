"""`--max-concurrent` given on `--resume` replaces the limit saved with the study (Tune restores the old one)."""

from __future__ import annotations

import pytest

from ltstudy.study.tune import StudyOptions, run_study

from .conftest import TINY

pytestmark = pytest.mark.slow


def _saved_limit(experiment: str) -> int:
    """The concurrency limit in the searcher state Tune saved last (what a restore starts from)."""
    from ray.tune.utils.util import _load_newest_checkpoint

    return _load_newest_checkpoint(experiment, "search_gen_state-*.json")["name:StudyConcurrency"]["max_concurrent"]


def test_max_concurrent_changes_on_resume(ray_local, tmp_path):
    opts = dict(method="ce", num_trials=1, sampler="random", scheduler="none", storage=str(tmp_path / "s"),
                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", study_name="conc", retries=0, verbose=0,
                overrides={**TINY, "epochs": 1})
    first = run_study(StudyOptions(max_concurrent=1, **opts))
    assert _saved_limit(first.experiment_path) == 1
    resumed = run_study(StudyOptions(max_concurrent=3, resume=True, **opts))
    assert _saved_limit(resumed.experiment_path) == 3
