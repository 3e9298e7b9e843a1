"""Interrupt and kill a running ``ltstudy tune`` (2 concurrent trials, ASHA on), then ``--resume`` it with
nothing but the printed command: the study ends as if it had never stopped.

1. Ctrl-C (SIGINT to the whole process group) right after a trial finished: exit 130, the study run and
   the trial runs still running are KILLED and tagged, and stderr names the exact ``--resume`` command.
2. That command continues the study; right after the next trial finishes, SIGKILL the whole group.
3. The same command again finishes the study. Every trial has exactly one MLflow run, no metric step is
   logged twice, no Optuna trial is left RUNNING, and ASHA's rungs hold every decision from before.
"""

from __future__ import annotations

import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ltstudy.study import _compat
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.search.schedulers import STATE_FILE

from support.configs import TINY
from support.servers import ray_env

pytestmark = pytest.mark.slow
TRIALS = 6


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ltstudy.cli", *argv], cwd=cwd, env=env, text=True,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _after_next_completion(proc: subprocess.Popen, sig: signal.Signals) -> list[str]:
    """Read the driver's lines until a trial completes, then send ``sig`` to its whole process group."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if ": completed after epoch" in line:
            os.killpg(proc.pid, sig)
            break
    assert any(": completed after epoch" in line for line in lines), "".join(lines)[-3000:]
    return lines


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


def _wait_group_gone(pgid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _live_members(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            raise AssertionError(f"processes {_live_members(pgid)} of the study outlived it")
        time.sleep(0.1)


def _rungs(storage: Path) -> dict[float, dict[str, float]]:
    state = pickle.loads((storage / "resume" / STATE_FILE).read_bytes())
    return {m: rec for m, rec in state["rungs"][0]}


def _pickled_classes(folder: Path) -> set[str]:
    """Every ltstudy class the study's pickle files name (what --resume unpickles by module path)."""
    found: set[str] = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module.startswith("ltstudy"):
                found.add(f"{module}.{name}")
            return super().find_class(module, name)

    for path in folder.glob("*.pkl"):
        with path.open("rb") as src:
            Recording(src).load()
    return found


def test_interrupt_kill_and_resume(tmp_path, mlflow_server):
    ray_env()
    storage = tmp_path / "storage"
    first = ["tune", "--method", "ce", "--num-trials", str(TRIALS), "--max-concurrent", "2", "--sampler", "random",
             "--grace-period", "1", "--retries", "0", "--storage", str(storage), "--tracking-uri", mlflow_server,
             "--study-name", "resume", *[f"{k}={v}" for k, v in TINY.items()], "epochs=4", "schedule=cosine"]
    # 1. Ctrl-C
    proc = _start(first, tmp_path)
    _after_next_completion(proc, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    _wait_group_gone(proc.pid)
    assert proc.returncode == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("interrupted: SIGINT: study resume stopped") and "resume with: ltstudy tune" in line
    command = shlex.split(line.split("resume with: ", 1)[1])
    mlc = MlflowClient(mlflow_server)
    exp = mlc.get_experiment_by_name("resume")
    (parent,) = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'study'")
    assert parent.info.status == "KILLED" and parent.data.tags["ltstudy.interrupted"] == "SIGINT"
    runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # 2. resume with the printed command, then SIGKILL the whole group after the next completion
    proc = _start(command[1:], tmp_path)
    _after_next_completion(proc, signal.SIGKILL)
    proc.wait()
    _wait_group_gone(proc.pid)
    before_kill = _rungs(storage)
    assert sum(len(rec) for rec in before_kill.values()) >= 2
    # 3. resume again: the study completes
    done = subprocess.run([sys.executable, "-m", "ltstudy.cli", *command[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'trial'", max_results=100)
    ids = [r.data.tags["ltstudy.trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == TRIALS, ids
    for r in runs:
        steps = [m.step for m in mlc.get_metric_history(r.info.run_id, "val_loss")]
        assert steps == list(range(1, len(steps) + 1)), (r.data.tags["ltstudy.status"], steps)
        assert r.info.status in ("FINISHED", "KILLED", "FAILED") and r.data.tags["ltstudy.status"] != "running"
    ot = optuna.load_study(study_name="resume", storage=open_optuna_storage(str(storage / OPTUNA_JOURNAL)))
    assert not [t.number for t in ot.trials if t.state == optuna.trial.TrialState.RUNNING]
    after = _rungs(storage)
    for milestone, recorded in before_kill.items():  # decisions after the kill used the rungs from before
        assert recorded.items() <= after[milestone].items(), (milestone, recorded, after[milestone])
    # after two interrupt-resume cycles the rungs hold every trial that reached each of them, whichever
    # run of the study it ran in (Tune's restore once put a stale copy of them back at every save)
    for r in runs:
        reached = max((m.step for m in mlc.get_metric_history(r.info.run_id, "val_loss")), default=0)
        for milestone, recorded in after.items():
            if reached >= milestone:
                assert r.data.tags["ltstudy.trial_id"] in recorded, (milestone, r.data.tags, recorded)
    (parent,) = mlc.search_runs([exp.experiment_id], "tags.`ltstudy.role` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.tags["ltstudy.interrupted"] == "false"
    # the classes the saved study named, and which the new processes unpickled, are the contract's
    pickled = _pickled_classes(storage / "resume")
    assert "ltstudy.study.search.searcher.LtOptunaSearch" in pickled and pickled <= set(_compat.PICKLED), pickled
