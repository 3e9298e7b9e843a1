"""The study's answer is one function (``recommended``): the confirmed winner when a study was confirmed,
with a t-interval and the paired difference against the published trial; ``--pick`` errors name the
problem."""

from __future__ import annotations

import math

import pytest

from ltstudy.errors import ConfigError
from ltstudy.study.results.selection import (
    Objectives,
    confirmed_ranking,
    pick_best,
    pick_point,
    recommended,
    t_half_width,
)

OBJ = Objectives(("val_top1",), ("max",))


def _trial(tid, number, value, published=False):
    return {"trial_id": tid, "number": number, "status": "completed", "metrics": {"val_top1": value},
            "published": published, "run_id": f"run-{tid}"}


def _conf(tid, seed, value):
    return {"confirms": tid, "seed": str(seed), "status": "completed", "metrics": {"val_top1": value}}


def test_the_confirmed_winner_is_the_answer_with_intervals_and_the_paired_difference():
    trials = [_trial("pub", 0, 0.60, published=True), _trial("lucky", 1, 0.80), _trial("solid", 2, 0.75)]
    assert recommended(trials, [], OBJ)["trial_id"] == "lucky"  # not confirmed: the single-seed best
    confirmations = [_conf("pub", s, v) for s, v in ((1, 0.60), (2, 0.62), (3, 0.58))]
    confirmations += [_conf("lucky", s, v) for s, v in ((1, 0.61), (2, 0.60), (3, 0.62))]
    confirmations += [_conf("solid", s, v) for s, v in ((1, 0.70), (2, 0.73), (3, 0.70))]
    best = recommended(trials, confirmations, OBJ)
    assert best["trial_id"] == "solid" and best["run_id"] == "run-solid"
    row = best["confirmed"]
    assert row["mean"] == pytest.approx(0.71) and row["seeds"] == [1, 2, 3]
    # t(0.975, 2) = 4.303: half-width = 4.303 * stdev / sqrt(3)
    assert row["ci95"] == pytest.approx(4.3027 * 0.017320508 / math.sqrt(3), rel=1e-3)
    assert row["diff"] == pytest.approx(0.11)  # paired: (0.10 + 0.11 + 0.12) / 3
    assert row["diff_ci95"] == pytest.approx(4.3027 * 0.01 / math.sqrt(3), rel=1e-3)
    ranking = confirmed_ranking(confirmations, OBJ, "pub")
    assert [r["trial_id"] for r in ranking] == ["solid", "lucky", "pub"] and ranking[2]["diff"] == 0
    assert math.isnan(t_half_width([0.5]))


def test_pick_names_an_unknown_metric():
    obj = Objectives(("val_top1", "val_few"), ("max", "max"))
    trials = [{"trial_id": "a", "status": "completed", "metrics": {"val_top1": 0.5, "val_few": 0.2}},
              {"trial_id": "b", "status": "completed", "metrics": {"val_top1": 0.4, "val_few": 0.3}}]
    with pytest.raises(ConfigError, match="no metric 'val_fwe'"):
        pick_point(trials, obj, "max val_top1 where val_fwe >= 0.1")
    with pytest.raises(ConfigError, match="no metric 'val_top'"):
        pick_point(trials, obj, "max val_top")
    with pytest.raises(ConfigError, match="no Pareto point satisfies"):
        pick_point(trials, obj, "max val_top1 where val_few >= 0.9")
    assert pick_point(trials, obj, "max val_top1 where val_few >= 0.25")["trial_id"] == "b"


def test_a_tie_goes_to_the_earlier_trial_in_the_summary_and_on_the_board():
    """Equal values (trials at chance, 9.00 % on 100 images) used to name whichever trial came first in
    MLflow's search order in the summary, and whichever finished first on the progress board."""
    import io

    from rich.console import Console

    from ltstudy.study.progress import ProgressBoard

    for order in ([2, 0, 1], [1, 2, 0], [0, 1, 2]):
        trials = [_trial(f"t{n}", n, 0.09) for n in order]
        assert pick_best(trials, OBJ)["number"] == 0
        assert recommended(trials, [], OBJ)["trial_id"] == "t0"
        board = ProgressBoard(Console(file=io.StringIO()), "val_top1", "max", num_trials=3)
        for n in order:
            board.end(f"t{n}", f"trial {n}", "completed", 1, 1, 0.09, number=n)
        assert board.best == (0.09, "trial 0")
    assert pick_best([_trial("a", 3, 0.09), _trial("b", 5, 0.10)], OBJ)["number"] == 5  # a better value wins
