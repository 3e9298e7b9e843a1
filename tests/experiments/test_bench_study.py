"""``bench study``: real ``ltstudy tune`` processes timed from start to exit, and the share of the machine
they used, computed from what the trials recorded in MLflow."""

from __future__ import annotations

import pytest

from ltstudy.cli import main
from ltstudy.experiments.bench_study import _row

from support.configs import TINY
from support.servers import ray_env


def test_share_used_counts_every_workers_slot():
    trials = [{"status": "completed", "in_trial_s": 10.0, "images": 1000.0, "startup_s": 2.0, "reused_process": 0.0},
              {"status": "completed", "in_trial_s": 20.0, "images": 3000.0, "startup_s": 4.0, "reused_process": 1.0}]
    one = _row("1 worker", trials, wall=20.0, slots=2, workers=1)
    assert one["share"] == pytest.approx(30 / 40) and one["trials_per_hour"] == pytest.approx(360)
    assert one["images_per_s"] == pytest.approx(200) and one["reused"] == 1
    assert one["startup"] == {"startup_s": pytest.approx(3.0)}
    two = _row("2 workers", trials, wall=40.0, slots=2, workers=2)  # each trial held both cores
    assert two["share"] == pytest.approx(60 / 80)


@pytest.mark.slow
def test_bench_study_runs_a_real_study_and_prints_its_share(tmp_path, monkeypatch, capsys):
    ray_env()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "study", "--trials", "2", "--epochs", "1", "--workers", "1", "--cpus", "1",
              *[f"{k}={v}" for k, v in TINY.items()]])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    row = next(line for line in out.splitlines() if "1 worker x 1 concurrent" in line and "2/2" in line)
    share = float(row.split("│")[4])
    assert 0 < share <= 1
    assert "start-up of a trial" in out and not list(tmp_path.iterdir())  # nothing left behind


def test_bench_study_refuses_more_workers_than_cores(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "study", "--workers", "4", "--cpus", "2"])
    assert exit_.value.code == 2 and "4 workers per trial need 4 CPUs" in capsys.readouterr().err
