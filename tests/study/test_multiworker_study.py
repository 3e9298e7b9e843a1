"""A study of two-worker (Ray Train DDP) trials under ASHA: every trial recorded, no placement group left."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study.run import StudyOptions, run_study

from support.configs import TINY

pytestmark = pytest.mark.slow


def test_two_worker_trials_finish_and_free_their_workers(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(StudyOptions(
        method="ce", num_trials=2, max_concurrent=1, workers=2, cpus_per_worker=1.0, sampler="random",
        seed=1, storage=str(tmp_path / "storage"), tracking_uri=uri, study_name="ddp", retries=0,
        verbose=0, fixed={**TINY, "epochs": 2}))
    assert sum(summary.counts.values()) == 2 and "failed" not in summary.counts
    # Tune kills each trial's actor at its end (ASHA stop or max_t); the Train workers' group must go too.
    groups = ray_local.util.placement_group_table().values()
    assert not [g for g in groups if g["state"] == "CREATED"]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("ddp").experiment_id])
    assert len([r for r in runs if r.data.tags.get("ltstudy.role") == "trial"]) == 2
