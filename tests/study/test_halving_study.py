"""A real successive-halving study (Tune + Optuna + MLflow) from the command line, stopped by Ctrl-C once its
first budget has finished and resumed with the printed command: one run and one Optuna trial per Tune trial,
each tagged with its budget, exactly the ladder's trials, and the answer a full-budget run."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from ltstudy.cli import main
from ltstudy.study.search.optuna_storage import OPTUNA_JOURNAL, open_optuna_storage
from ltstudy.study.tracking.records import find_study, study_trials

from support.configs import TINY
from support.servers import ray_env, session_members

pytestmark = pytest.mark.slow

SPACE = """\
method: ce
metric: val_loss
mode: min
fixed: {epochs: 9}
tune:
  lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
"""


def _interrupt_after(argv: list[str], completions: int, cwd) -> str:
    """Run ``ltstudy`` until ``completions`` trials have completed, Ctrl-C its process group, and return
    the resume command it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "ltstudy.cli", *argv], cwd=cwd, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if sum(": completed after epoch" in s for s in seen) == completions:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    deadline = time.monotonic() + 60
    while session_members(proc.pid):
        assert time.monotonic() < deadline, f"processes {session_members(proc.pid)} outlived the study"
        time.sleep(0.1)
    assert proc.returncode == 130, "".join(seen)[-2000:] + out[-2000:] + err[-3000:]
    return err.strip().splitlines()[-1].split("resume with: ", 1)[1]


def test_halving_study_interrupted_resumed_records_and_answer(tmp_path):
    ray_env()
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = tmp_path / "storage"
    argv = ["tune", "--method", "ce", "--space", str(space), "--num-trials", "4", "--max-concurrent", "2",
            "--sampler", "random", "--seed", "5", "--scheduler", "halving", "--storage", str(storage),
            "--tracking-uri", uri, "--study-name", "sh", "--retries", "0", *[f"{k}={v}" for k, v in TINY.items()]]
    # Ctrl-C once the 4 runs of the first budget are done: the promotions are decided, maybe started
    command = shlex.split(_interrupt_after(argv, 4, tmp_path))
    done = subprocess.run([sys.executable, "-m", "ltstudy.cli", *command[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    mlc, exp, parent = find_study(uri, "sh")
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    # 4 configurations at 3 epochs, then the published one and the best other at the full 9: not one more
    assert sorted(t["budget"] for t in trials) == ["3/9"] * 4 + ["9/9"] * 2
    assert all(t["status"] == "completed" and t["mlflow_status"] == "FINISHED" for t in trials)
    assert {t["params"]["epochs"] for t in trials} == {"3", "9"}
    for t in trials:  # a run interrupted mid-way went on from its checkpoint: no epoch logged twice
        steps = [m.step for m in mlc.get_metric_history(t["run_id"], "val_loss")]
        assert steps == list(range(1, int(t["params"]["epochs"]) + 1)), (t["budget"], steps)
    full = [t for t in trials if t["budget"] == "9/9"]
    assert sum(t["published"] for t in full) == 1
    short = {t["tuned"]["lr"]: t["metrics"]["val_loss"] for t in trials if t["budget"] == "3/9" and not t["published"]}
    promoted = next(t for t in full if not t["published"])["tuned"]["lr"]
    assert short[promoted] == min(short.values())  # the best of the short runs went on
    ot = optuna.load_study(study_name="sh", storage=open_optuna_storage(str(storage / OPTUNA_JOURNAL)))
    assert len(ot.trials) == len(trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ot.trials)
    # the answer is a full-budget run: in the summary, on the study run and in the export
    (line,) = [x for x in done.stdout.splitlines() if "best trial" in x]
    assert [t for t in full if f"run {t['run_id']}" in line], line
    out = tmp_path / "best.yaml"
    with pytest.raises(SystemExit) as exported:
        main(["best-config", "export", "--study", "sh", "--tracking-uri", uri, "-o", str(out)])
    assert exported.value.code in (0, None)
    best = yaml.safe_load(out.read_text())
    assert best["provenance"]["run_id"] in {t["run_id"] for t in full} and best["epochs"] == 9
