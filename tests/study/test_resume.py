"""SIGKILL the ``ltstudy tune`` driver mid-study, then ``--resume``: finished trials are kept (not re-run),
the rest finish, and MLflow ends with exactly one run per trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from .conftest import REPO, TINY, ray_env

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


def test_sigkill_then_resume(tmp_path, mlflow_server):
    ray_env()
    env = dict(os.environ)
    driver = subprocess.Popen(_cmd(tmp_path, mlflow_server, resume=False), cwd=REPO, env=env, start_new_session=True,
                              stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    done_before: dict[str, tuple[str, int]] = {}
    try:
        while time.time() < deadline and driver.poll() is None:
            runs = _trial_runs(mlflow_server)
            finished = [r for r in runs if r.data.tags.get("ltstudy.status") == "completed"]
            if finished and len(runs) > len(finished):
                done_before = {r.data.tags["ltstudy.trial_id"]: (r.info.run_id, r.info.end_time)
                               for r in finished}
                break
            time.sleep(1)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert done_before, "no trial finished before the deadline"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        time.sleep(3)
        try:  # Ray processes the driver started share its session; make sure none survive
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    resumed = subprocess.run(_cmd(tmp_path, mlflow_server, resume=True), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = _trial_runs(mlflow_server)
    ids = [r.data.tags["ltstudy.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == 4, ids
    by_id = {r.data.tags["ltstudy.trial_id"]: r for r in runs}
    for tid, (run_id, end_time) in done_before.items():
        assert by_id[tid].info.run_id == run_id
        assert by_id[tid].info.end_time == end_time  # not re-run
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    print(f"SIGKILL/resume: {len(runs)} MLflow trial runs for 4 trials; kept {len(done_before)} finished")
