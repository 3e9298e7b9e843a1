"""A study's trials run one after another in one reused process, say what their start-up cost, and keep a
final checkpoint although they write one only every few epochs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study import trainable
from ltstudy.study.run import StudyOptions, run_study
from ltstudy.study.tracking.records import find_study, study_trials
from ltstudy.study.tracking.store import CHECKPOINT_TAG

from support.configs import TINY

pytestmark = pytest.mark.slow


def test_sequential_trials_reuse_one_process_and_record_their_startup(ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(StudyOptions(
        method="ce", num_trials=3, max_concurrent=1, scheduler="none", sampler="random", seed=2,
        storage=str(tmp_path / "storage"), tracking_uri=uri, study_name="reuse", retries=0, verbose=0,
        checkpoint_every=5, fixed={**TINY, "epochs": 3}))
    assert summary.counts == {"completed": 3}
    mlc, exp, parent = find_study(uri, "reuse")
    trials = sorted(study_trials(mlc, exp.experiment_id, parent.info.run_id), key=lambda t: t["number"])
    first = [mlc.get_metric_history(t["run_id"], "reused_process")[0].value for t in trials]
    assert first == [0.0, 1.0, 1.0]  # torch, ltstudy and the dataset were loaded once
    for t in trials:
        run = MlflowClient(uri).get_run(t["run_id"])
        m = run.data.metrics
        assert m["startup_s"] > 0 and m["startup_data_model_s"] >= 0 and "startup_ray_s" in m
        # checkpoint_every 5 > epochs: only the last epoch wrote one, and it is the trial's checkpoint
        assert (Path(run.data.tags[CHECKPOINT_TAG]) / "checkpoint.pt").is_file()
    reused = [mlc.get_run(t["run_id"]).data.metrics["startup_import_s"] for t in trials[1:]]
    assert reused == [0.0, 0.0]


def test_a_multi_worker_study_says_what_its_workers_cost_to_start(ray_local, tmp_path, monkeypatch):
    said: list[str] = []
    # this process "imported ltstudy" a day ago: a trial must report its own process's stamps, not the
    # copies a pickled closure would carry from here
    monkeypatch.setitem(trainable._IMPORTS, "import_started", time.time() - 86400)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_study(StudyOptions(
        method="ce", num_trials=1, max_concurrent=1, workers=2, cpus_per_worker=1.0, scheduler="none",
        sampler="random", seed=1, storage=str(tmp_path / "storage"), tracking_uri=uri, study_name="ddp-start",
        retries=0, verbose=0, checkpoint_every=1, fixed={**TINY, "epochs": 2}), say=said.append)
    assert summary.counts == {"completed": 1}
    lines = [s for s in said if "workers ready" in s]
    assert len(lines) == 1 and "Train driver" in lines[0] and "process group" in lines[0], said
    # a two-epoch trial of tiny images is far shorter than its workers' start-up
    assert any(s.startswith("warning:") and "--workers 1" in s for s in said), said
    mlc, exp, parent = find_study(uri, "ddp-start")
    (t,) = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    run = mlc.get_run(t["run_id"])
    assert run.data.metrics["startup_worker_setup_s"] >= 0 and run.data.metrics["startup_s"] > 0
    assert run.data.metrics["startup_driver_s"] < 3600
    # checkpoints were uploaded in the background (Ray Train's ASYNC mode) and the last one is complete
    assert (Path(run.data.tags[CHECKPOINT_TAG]) / "checkpoint.pt").is_file()
