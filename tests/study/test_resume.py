"""SIGKILL the ``ltstudy tune`` driver right after a trial finished, then ``--resume``: the finished trial
keeps its run and is not trained again, the rest finish, and MLflow ends with exactly one run per trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import TINY, ray_env

pytestmark = pytest.mark.slow


def _cmd(tmp, uri: str, resume: bool) -> list[str]:
    tiny = [f"{k}={v}" for k, v in TINY.items()]
    return [sys.executable, "-m", "ltstudy.cli", "tune", "--method", "ce", "--num-trials", "4",
            "--max-concurrent", "1", "--scheduler", "none", "--sampler", "random", "--retries", "0",
            "--storage", str(tmp / "storage"), "--tracking-uri", uri,
            "--study-name", "resume", *(["--resume"] if resume else []), *tiny, "epochs=3"]


def _trial_runs(uri):
    # Through the server: a second process opening the driver's SQLite file races its schema setup.
    mlc = MlflowClient(uri)
    exp = mlc.get_experiment_by_name("resume")
    if exp is None:
        return []
    return mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'", max_results=100)


def _live_members(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (a container's init may never reap them)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _kill_group(driver: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL the driver's process group (the driver and the Ray processes it started); wait until no
    process of it runs any more."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait()
    deadline = time.monotonic() + timeout
    while _live_members(driver.pid):
        assert time.monotonic() < deadline, f"processes {_live_members(driver.pid)} survived SIGKILL"
        time.sleep(0.1)


def test_sigkill_then_resume(tmp_path, mlflow_server):
    ray_env()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(_cmd(tmp_path, mlflow_server, resume=False), cwd=tmp_path, env=env,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    log = []
    try:
        for line in driver.stdout:  # the driver prints one line per finished trial
            log.append(line)
            if ": completed after epoch" in line:
                break
    finally:
        _kill_group(driver)
    assert any(": completed after epoch" in line for line in log), "".join(log)[-3000:]
    done_before = {r.data.tags["ltstudy.trial_id"]: r.info.run_id
                   for r in _trial_runs(mlflow_server) if r.data.tags.get("ltstudy.status") == "completed"}
    assert done_before
    resumed = subprocess.run(_cmd(tmp_path, mlflow_server, resume=True), cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = _trial_runs(mlflow_server)
    ids = [r.data.tags["ltstudy.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == 4, ids
    by_id = {r.data.tags["ltstudy.trial_id"]: r for r in runs}
    mlc = MlflowClient(mlflow_server)
    for tid, run_id in done_before.items():
        assert by_id[tid].info.run_id == run_id
        steps = [m.step for m in mlc.get_metric_history(run_id, "val_loss")]
        assert steps == [1, 2, 3], steps  # not trained again: no epoch logged twice
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
