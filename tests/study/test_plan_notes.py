"""A study whose early stopping can save little says so when it is planned (nothing is trained)."""

from __future__ import annotations

from ltstudy.study.options import StudyOptions
from ltstudy.study.plan import plan_study


def _notes(tmp_path, method, **kw):
    plan = plan_study(StudyOptions(method=method, fixed={"dataset": "synthetic", **kw.pop("fixed", {})},
                                   storage=str(tmp_path / "s"), tracking_uri=f"sqlite:///{tmp_path}/m.db", **kw))
    return plan, [n for n in plan.notes if n.startswith("early stopping can save")]


def test_stopping_that_saves_little_is_noted(tmp_path):
    plan, notes = _notes(tmp_path, "ldam_drw")  # DRW's phase: the first rung at 196 of 200 epochs
    assert (plan.grace, plan.max_t) == (196, 200) and "at most 2%" in notes[0] and "epoch 196 of 200" in notes[0]
    _, notes = _notes(tmp_path, "ce", fixed={"epochs": 20})  # the lr milestones scale: rung 19 of 20
    assert "at most 5%" in notes[0] and "epoch 19 of 20" in notes[0]
    _, notes = _notes(tmp_path, "ce", grace_period=10)
    assert notes == []
    _, notes = _notes(tmp_path, "ldam_drw", scheduler="none")
    assert notes == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # planning writes nothing


def test_halving_states_its_budgets_and_says_when_it_saves_nothing(tmp_path):
    plan = plan_study(StudyOptions(method="ldam_drw", scheduler="halving", fixed={"dataset": "synthetic"},
                                   storage=str(tmp_path / "s"), tracking_uri=f"sqlite:///{tmp_path}/m.db"))
    assert [(b.trials, b.epochs) for b in plan.budgets] == [(16, 22), (6, 67), (2, 200)]
    assert plan.tune_trials == 24 and plan.rungs == ()
    assert "halving: 16 at 22, 6 at 67, 2 at 200 epochs; 1,154 of 3,200 epochs (64% saved)" in plan.notes[-1]
    plan = plan_study(StudyOptions(method="ldam_drw", scheduler="halving", num_trials=3,
                                   fixed={"dataset": "synthetic"}, storage=str(tmp_path / "s"),
                                   tracking_uri=f"sqlite:///{tmp_path}/m.db"))
    assert len(plan.budgets) == 1 and "nothing is saved" in plan.notes[-1]
