"""SIGKILL a study with two trials in flight (the third and fourth, started after the first two ended), at
three moments, then ``--resume`` it: the study ends with
exactly ``--num-trials`` trials, one MLflow run each, none left RUNNING, no epoch logged twice, and as many
Optuna trials as Tune trials. This holds because Tune's experiment state is saved in the step in which a
trial is added and in which a trial checkpoints (``schedulers.SavesState``), not only on Tune's period, so
the resumed study knows every trial that was running and continues it from its last checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.tracking.store import TRIAL_TAG

from support.configs import TINY
from support.servers import ray_env, session_members

pytestmark = pytest.mark.slow
TRIALS, EPOCHS = 4, 8


def _wait_gone(sid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while session_members(sid):
        assert time.monotonic() < deadline, f"processes {session_members(sid)} outlived the killed study"
        time.sleep(0.1)


def _checkpoints(storage: Path) -> set[Path]:
    return set(storage.glob("kill/*/checkpoint_*"))


@pytest.mark.parametrize("moment", ["trial start", "mid-epoch", "checkpoint"])
def test_sigkill_with_two_trials_in_flight_then_resume(moment, tmp_path):
    ray_env()
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "storage"
    where = ["--study-name", "kill", "--storage", str(storage), "--tracking-uri", uri]
    argv = ["tune", "--method", "ce", *where, "--num-trials", str(TRIALS), "--max-concurrent", "2",
            "--scheduler", "none", "--sampler", "random", "--retries", "0", "--checkpoint-every", "2",
            *[f"{k}={v}" for k, v in TINY.items()], f"epochs={EPOCHS}"]
    proc = subprocess.Popen([sys.executable, "-m", "ltstudy.cli", *argv], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines, started = [], 0
    try:
        for line in proc.stdout:
            lines.append(line)
            started += bool(re.match(r"trial \d+ started", line))
            if started == 4:  # trials 2 and 3, added after Tune's first save of the experiment
                break
        assert started == 4, "".join(lines)[-3000:]
        if moment == "mid-epoch":
            time.sleep(1.5)
        elif moment == "checkpoint":
            before, deadline = _checkpoints(storage), time.monotonic() + 60
            while _checkpoints(storage) <= before and time.monotonic() < deadline:
                time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # at once: no atexit, no finally, no flush
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_gone(proc.pid)

    done = subprocess.run([sys.executable, "-m", "ltstudy.cli", "tune", "--resume", *where], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"{TRIALS + 1}/{TRIALS} done" not in done.stdout
    mlc = MlflowClient(uri)
    exp = mlc.get_experiment_by_name("kill")
    runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'")
    assert len(runs) == TRIALS and len({r.data.tags[TRIAL_TAG] for r in runs}) == TRIALS, \
        [(r.info.run_name, r.info.status) for r in runs]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["ltstudy.status"] == "completed", r.data.tags
        steps = [m.step for m in mlc.get_metric_history(r.info.run_id, "val_loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (r.info.run_name, steps)  # each epoch once
    study = optuna.load_study(study_name="kill", storage=open_optuna_storage(str(storage / OPTUNA_JOURNAL)))
    assert len(study.trials) == TRIALS, [t.state for t in study.trials]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials), [t.state for t in study.trials]
    tune_ids = {p.name.split("_")[3] for p in storage.glob("kill/single_worker_trial_*")}  # a resumed trial
    assert len(tune_ids) == TRIALS, tune_ids  # may get a second folder (a new time stamp): count its id once


def _listed_checkpoints(storage: Path) -> dict[str, list[Path]]:
    """Running trial id -> the checkpoint folders the newest experiment state lists for it, oldest first
    (read as Tune's restore reads it)."""
    from ray.tune.experiment.trial import Trial

    state = json.loads(max(storage.glob("kill/experiment_state-*.json")).read_text())
    listed = {}
    for trial_json, run_metadata in state["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        trial.restore_run_metadata(run_metadata)
        if trial.status != "TERMINATED":
            manager = trial.run_metadata.checkpoint_manager
            listed[trial.trial_id] = [Path(r.checkpoint.path) for r in manager.best_checkpoint_results]
    return listed


def _two_listed_each(storage: Path) -> bool:
    """Whether the newest experiment state lists two checkpoints for each of two running trials."""
    try:
        listed = _listed_checkpoints(storage)
    except (OSError, ValueError, KeyError):  # no state yet, or one being replaced
        return False
    return len(listed) == 2 and all(len(paths) == 2 for paths in listed.values())


def test_a_state_that_lists_checkpoints_tune_had_removed_resumes(tmp_path):
    """A killed driver's experiment state can be a step or two behind: Tune registered a trial's new
    checkpoint and removed the oldest it kept (``num_to_keep=2``) after the state was saved. Here one trial's
    older listed checkpoint is gone, and every listed checkpoint of the other: the first continues from its
    latest, the second from its first epoch, and neither brings Tune's "Error handling checkpoint"."""
    ray_env()
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "storage"
    where = ["--study-name", "kill", "--storage", str(storage), "--tracking-uri", uri]
    argv = ["tune", "--method", "ce", *where, "--num-trials", "2", "--max-concurrent", "2", "--scheduler", "none",
            "--sampler", "random", "--retries", "0", "--checkpoint-every", "1",
            *[f"{k}={v}" for k, v in TINY.items()], f"epochs={EPOCHS}"]
    proc = subprocess.Popen([sys.executable, "-m", "ltstudy.cli", *argv], cwd=tmp_path, text=True,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180  # the state, not the disk: a folder is written before Tune lists it
        while not _two_listed_each(storage) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_gone(proc.pid)
    listed = _listed_checkpoints(storage)
    assert len(listed) == 2 and all(len(paths) == 2 for paths in listed.values()), listed
    first, second = listed.values()
    shutil.rmtree(first[0], ignore_errors=True)  # what Tune removed after the save
    for path in second:
        shutil.rmtree(path, ignore_errors=True)

    done = subprocess.run([sys.executable, "-m", "ltstudy.cli", "tune", "--resume", *where], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Error handling checkpoint" not in done.stderr, done.stderr[-3000:]
    mlc = MlflowClient(uri)
    runs = mlc.search_runs([mlc.get_experiment_by_name("kill").experiment_id], "tags.`ltstudy.role` = 'trial'")
    assert len(runs) == 2, [(r.info.run_name, r.info.status) for r in runs]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["ltstudy.status"] == "completed", r.data.tags
        steps = [m.step for m in mlc.get_metric_history(r.info.run_id, "val_loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (r.info.run_name, steps)
