"""Successive halving over schedule-scaled runs: the budget arithmetic, the compressed recipe, and the
searcher promoting by the objective (driven by hand: values depend on the configuration)."""

from __future__ import annotations

import math

import optuna
import pytest

from ltstudy.config import BUDGET_KEY, PUBLISHED_KEY, resolve_config
from ltstudy.errors import ConfigError
from ltstudy.study.options import StudyOptions
from ltstudy.study.plan import plan_study
from ltstudy.study.results.selection import Objectives, gain_over_published, pick_best, published_trial
from ltstudy.study.search.halving import HalvingSearch, ladder, scaled_settings, total_epochs
from ltstudy.study.search.schedulers import asha_epochs
from ltstudy.study.search.space import parse_space
from ltstudy.study.tracking.records import is_partial
from ltstudy.train import phase_epochs


@pytest.mark.parametrize(("epochs", "configs", "expected", "spent"), [
    (200, 16, [(22, 16), (67, 6), (200, 2)], 1154),
    (200, 28, [(7, 28), (22, 10), (67, 4), (200, 2)], 1084),
    (27, 10, [(3, 10), (9, 4), (27, 2)], 120),
    (20, 16, [(7, 16), (20, 6)], 232),  # 20/9 < 3 epochs: two budgets
    (200, 3, [(200, 3)], 600),  # too few configurations to halve
    (8, 16, [(3, 16), (8, 6)], 96),  # 8/3 rounds to 3
    (7, 16, [(7, 16)], 112),  # too few epochs
])
def test_ladder(epochs, configs, expected, spent):
    budgets = ladder(epochs, configs)
    assert [(b.epochs, b.trials) for b in budgets] == expected and total_epochs(budgets) == spent


def test_asha_nominal_epochs():
    # one rung at 196 of 200 (ldam_drw's default space): 16 trials x 196, then 8 go on for 4 epochs
    assert asha_epochs(16, 200, (196,), 2.0) == 16 * 196 + 8 * 4
    assert asha_epochs(16, 200, (), 2.0) == 16 * 200  # no rung: nothing stops
    assert asha_epochs(8, 16, (1, 2, 4, 8), 2.0) == 8 + 4 + 2 * 2 + 1 * 4 + 1 * 8


@pytest.mark.parametrize("method", ["ldam_drw", "metasaug", "fsgl", "ce"])
def test_a_compressed_recipe_keeps_its_phases_at_the_same_fractions(method):
    full = resolve_config({"method": method})
    short = resolve_config({"method": method, **scaled_settings({}, 20, 200, full.train.warmup_epochs)})
    assert short.train.epochs == 20 and short.train.warmup_epochs == math.floor(full.train.warmup_epochs / 10 + 0.5)
    # every phase of the 200-epoch recipe lands at a tenth of its epoch (each rounded to a whole epoch)
    long, compressed = phase_epochs(full), phase_epochs(short)
    assert len(long) == len(compressed) and all(abs(e / 10 - c) <= 1 for e, c in zip(long, compressed, strict=True))


def test_ldam_drw_at_a_ninth():
    cfg = resolve_config({"method": "ldam_drw", **scaled_settings({}, 22, 200, 5)})
    assert phase_epochs(cfg) == [1, 17, 19]  # warm-up 5 -> 0.55 -> 1, DRW 160 -> 17, lr step 180 -> 19


def _searcher(space: dict, budgets) -> HalvingSearch:
    space = parse_space(space, "x.yaml")
    return HalvingSearch(budgets=budgets, full_epochs=27, warmup_epochs=0, space=space.define_by_run(),
                         metric=space.searcher_metric, mode=space.searcher_mode,
                         points_to_evaluate=[space.published_point()], sampler=optuna.samplers.RandomSampler(seed=1),
                         study_name="s", storage=optuna.storages.InMemoryStorage())


SPACE = {"method": "ce", "fixed": {"epochs": 27, "warmup_epochs": 0},
         "tune": {"lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}}


def _value(config: dict) -> float:
    """A validation accuracy that depends on the configuration (best at lr 0.3) and grows with the budget."""
    return 0.9 - abs(math.log(config["lr"] / 0.3)) * 0.1 - 1.0 / config["epochs"]


def test_halving_promotes_the_best_and_the_published_and_only_they_reach_the_full_recipe():
    budgets = ladder(27, 10)  # 10 at 3 epochs, 4 at 9, 2 at 27
    s = _searcher(SPACE, budgets)
    planted = "t9"
    runs, n = {}, 0
    while (config := s.suggest(f"t{n}")) != "FINISHED":
        if config is None:  # waiting: finish the oldest running trial
            tid = next(t for t in runs if t not in s.values)
            s.on_trial_complete(tid, {"epoch": runs[tid]["epochs"], "epochs_total": runs[tid]["epochs"],
                                      "val_top1": _value(runs[tid])})
            continue
        if f"t{n}" == planted:
            # the planted configuration: clearly the best (Optuna's values are the ones enqueued next time)
            config["lr"] = 0.3
            s.params[planted]["lr"] = 0.3
            s.origin[planted] = {**s.origin[planted], "lr": 0.3}
        runs[f"t{n}"] = config
        n += 1
    assert len(runs) == sum(b.trials for b in budgets) == 16
    assert [sum(c["epochs"] == e for c in runs.values()) for e in (3, 9, 27)] == [10, 4, 2]
    full = [c for c in runs.values() if c["epochs"] == 27]
    assert {c["lr"] for c in full} >= {0.3} and sum(bool(c.get(PUBLISHED_KEY)) for c in full) == 1
    assert all(c[BUDGET_KEY] == f"{c['epochs']}/27" for c in runs.values())
    trials = s._ot_study.get_trials()  # one Optuna trial per Tune trial, promotions say where they came from
    assert len(trials) == 16 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sum("ltstudy_promoted_from" in t.user_attrs for t in trials) == 6


def test_selection_takes_only_full_budget_runs():
    obj = Objectives(("val_top1",), ("max",))
    rec = [("a", 0, True, "3/27", 0.95), ("b", 1, False, "3/27", 0.99), ("c", 2, True, "27/27", 0.7),
           ("d", 3, False, "27/27", 0.8)]
    trials = [{"trial_id": t, "number": n, "published": p, "budget": b, "partial": is_partial(b), "status": "completed",
               "metrics": {"val_top1": v}} for t, n, p, b, v in rec]
    assert pick_best(trials, obj)["trial_id"] == "d"  # b is better, at a ninth of the recipe only
    assert published_trial(trials)["trial_id"] == "c"
    assert gain_over_published(trials, pick_best(trials, obj), obj) == {"val_top1": pytest.approx(0.1)}


def test_halving_refuses_a_multi_objective_study(tmp_path):
    path = tmp_path / "mo.yaml"
    path.write_text("method: ce\nmetric: [val_top1, val_few]\nmode: [max, max]\n"
                    "tune:\n  lr: {type: float, low: 0.01, high: 0.5, log: true}\n")
    with pytest.raises(ConfigError, match="halving promotes by one objective"):
        plan_study(StudyOptions(method="ce", scheduler="halving", space_path=str(path),
                                fixed={"dataset": "synthetic"}, storage=str(tmp_path / "s"),
                                tracking_uri=f"sqlite:///{tmp_path}/m.db"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mo.yaml"]
