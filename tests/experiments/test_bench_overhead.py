"""``bench overhead``: ltstudy and plain Ray Tune on the same trial length in one run, the overhead split into a
fixed and a per-trial cost, and the commands a person runs over the finished study timed."""

from __future__ import annotations

import pytest

from ltstudy.cli import main
from ltstudy.experiments.bench_overhead import _figures, _fit

from support.servers import ray_env


def test_overhead_is_the_slot_time_not_spent_in_trials_and_the_fit_splits_it():
    row = _figures(trials=10, slots=2, wall=30.0, work=40.0)
    assert row["share"] == pytest.approx(40 / 60) and row["overhead_per_trial"] == pytest.approx(2.0)
    rows = [_figures(n, 2, (20.0 + 0.5 * n + 3.0 * n) / 2, 3.0 * n) for n in (8, 32, 96)]  # 20 fixed, 0.5 each
    fit = _fit(rows)
    assert fit["fixed_slot_s"] == pytest.approx(20.0) and fit["per_trial_slot_s"] == pytest.approx(0.5)
    assert _fit(rows[:1]) == {}


@pytest.mark.slow
def test_the_feature_stage_case_runs_both_and_times_the_commands_after(tmp_path, monkeypatch, capsys):
    ray_env()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "overhead", "--features", "--trials", "3", "--concurrent", "1"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    row = next(line for line in out.splitlines() if line.strip().startswith("│      3 "))
    ltstudy_wall, plain_wall = (float(v) for v in row.split("│")[3].split("/"))
    assert ltstudy_wall > 0 and plain_wall > 0
    for command in ("studies show", "report", "best-config export", "MLflow UI runs page",
                    "Optuna ask at the last trial"):
        assert f"{command}: " in out, out
    assert not list(tmp_path.iterdir())  # everything lived in a temporary folder


def test_bench_overhead_refuses_bad_counts(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "overhead", "--trials", "8,x"])
    assert exit_.value.code == 2 and "--trials" in capsys.readouterr().err
