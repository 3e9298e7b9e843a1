"""MLflow records are written off Tune's controller thread, yet none is lost: SIGKILL a running
``ltstudy tune`` (the whole process group, nothing can flush) right after it printed a trial's end line,
and that trial's run already holds every epoch's metrics, its final status and its end tags; ``--resume``
then finishes the study with one run per trial and no step logged twice.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study.tracking.store import CHECKPOINT_TAG, EPOCHS_TAG, NUMBER_TAG, STATUS_TAG, WALL_TAG

from support.configs import TINY
from support.servers import ray_env, session_members

pytestmark = pytest.mark.slow
EPOCHS = 3


def _wait_gone(sid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while session_members(sid):
        assert time.monotonic() < deadline, f"processes {session_members(sid)} outlived the killed study"
        time.sleep(0.1)


def _steps(mlc: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in mlc.get_metric_history(run_id, key))


def test_sigkill_right_after_a_trial_ends_loses_none_of_its_records(tmp_path):
    ray_env()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = ["--method", "ce", "--study-name", "kill", "--storage", str(tmp_path / "storage"), "--tracking-uri", uri]
    argv = ["tune", *where, "--num-trials", "2", "--max-concurrent", "1", "--scheduler", "none", "--sampler",
            "random", "--retries", "0", *[f"{k}={v}" for k, v in TINY.items()], f"epochs={EPOCHS}"]
    proc = subprocess.Popen([sys.executable, "-m", "ltstudy.cli", *argv], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"trial 0: completed after epoch", line):
                os.killpg(proc.pid, signal.SIGKILL)  # at once: no atexit, no finally, no flush
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_gone(proc.pid)
    assert any(line.startswith("trial 0: completed") for line in lines), "".join(lines)[-3000:]

    mlc = MlflowClient(uri)
    exp = mlc.get_experiment_by_name("kill")
    (run,) = mlc.search_runs([exp.experiment_id], f"tags.`{NUMBER_TAG}` = '0'")
    for key in ("train_loss", "val_loss", "val_top1", "lr"):
        assert _steps(mlc, run.info.run_id, key) == list(range(1, EPOCHS + 1)), key
    tags = run.data.tags
    assert run.info.status == "FINISHED" and tags[STATUS_TAG] == "completed", (run.info.status, tags)
    assert tags[EPOCHS_TAG] == str(EPOCHS) and tags["early_stopped"] == "false"
    assert WALL_TAG in tags and CHECKPOINT_TAG in tags
    artifacts = {a.path for a in mlc.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "per_class_accuracy.json", "reliability.json"} <= artifacts
    assert not any(a.endswith(".png") for a in artifacts)  # figures are the study run's, not a trial's

    done = subprocess.run([sys.executable, "-m", "ltstudy.cli", "tune", "--resume", *where], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'")
    assert sorted(r.data.tags["ltstudy.trial_id"] for r in runs) == sorted({r.data.tags["ltstudy.trial_id"]
                                                                           for r in runs})
    assert len(runs) == 2
    for r in runs:
        history = [m.step for m in mlc.get_metric_history(r.info.run_id, "val_loss")]
        assert sorted(history) == list(range(1, EPOCHS + 1)), history  # each epoch once
        assert r.info.status == "FINISHED" and r.data.tags[STATUS_TAG] == "completed"
