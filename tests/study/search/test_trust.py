"""The pieces that make a study's answer trustworthy, tested without a cluster: schedule phases and ASHA's
first rung, the published trial never stopped, ASHA's rungs across a restore, pruned trials told with
their value, orphaned Optuna trials failed, start-up trials and seeds, saved options, selection."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from ltstudy.config import PUBLISHED_KEY, resolve_config
from ltstudy.errors import ConfigError
from ltstudy.study.options import StudyOptions, parse_duration
from ltstudy.study.plan import schedule_budget
from ltstudy.study.results.selection import Objectives, confirmed_ranking, pareto_front, pick_best, pick_point
from ltstudy.study.search.optuna_storage import open_optuna_storage
from ltstudy.study.search.schedulers import StudyASHA, first_rung
from ltstudy.study.search.searcher import (
    LtOptunaSearch,
    make_sampler,
    sampler_warning,
    startup_trials,
    study_seed,
)
from ltstudy.study.search.space import parse_space
from ltstudy.study.tracking.store import trial_outcome
from ltstudy.train import phase_epochs

# -- phases and the first rung ------------------------------------------------------------------------


def test_phases_of_the_published_recipes():
    assert phase_epochs(resolve_config({"method": "ldam_drw"})) == [5, 160, 180]  # warm-up, DRW, lr steps
    assert phase_epochs(resolve_config({"method": "metasaug"})) == [160, 180]  # meta phase = lr step
    # cosine lr; the re-balanced branch outweighs the balanced one from epoch ceil(200 / sqrt 2)
    assert phase_epochs(resolve_config({"method": "fsgl"})) == [142]


def test_asha_first_rung_follows_the_latest_phase_any_config_can_have():
    space = parse_space({"method": "ldam_drw", "fixed": {"epochs": 200, "schedule": "cosine", "warmup_epochs": 0},
                         "tune": {"drw_start": {"type": "float", "low": 0.5, "high": 0.9}}}, "x.yaml")
    epochs, phases = schedule_budget(space, StudyOptions(method="ldam_drw"))
    assert epochs == 200 and max(phases) == 180  # drw_start = 0.9 at the top of its range
    assert first_rung(phases, "auto") == 181 and first_rung(phases, 3) == 3


def test_tuning_epochs_under_early_stopping_is_refused():
    space = parse_space({"method": "ce", "tune": {"epochs": {"type": "int", "low": 100, "high": 200}}}, "x.yaml")
    with pytest.raises(ConfigError, match="'epochs' is tuned"):
        schedule_budget(space, StudyOptions(method="ce"))
    assert schedule_budget(space, StudyOptions(method="ce", scheduler="none"))[0] == 200


# -- the scheduler ------------------------------------------------------------------------------------


def _trial(tid: str, published: bool = False) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config={PUBLISHED_KEY: True} if published else {})


def _asha(tmp_path) -> StudyASHA:
    return StudyASHA(time_attr="epoch", metric="val_top1", mode="max", max_t=8, grace_period=2,
                     reduction_factor=2, state_dir=str(tmp_path))


def test_the_published_trial_is_never_stopped_early_but_counts(tmp_path):
    asha = _asha(tmp_path)
    trials = [_trial(f"t{i}") for i in range(3)] + [_trial("pub", published=True), _trial("t9")]
    for t in trials:
        asha.on_trial_add(None, t)
    for i, t in enumerate(trials[:3]):
        assert asha.on_trial_result(None, t, {"epoch": 2, "val_top1": 0.5 + 0.1 * i}) == TrialScheduler.CONTINUE
    # below the rung's median: a plain trial stops, the published one continues and is recorded
    assert asha.on_trial_result(None, trials[3], {"epoch": 2, "val_top1": 0.1}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, trials[4], {"epoch": 2, "val_top1": 0.1}) == TrialScheduler.STOP
    rung2 = dict(asha.rungs)[2]
    assert rung2["pub"] == 0.1 and set(rung2) == {"t0", "t1", "t2", "pub", "t9"}


def test_asha_rungs_survive_the_restore_of_a_pickled_scheduler(tmp_path):
    asha = _asha(tmp_path)
    blob = pickle.dumps(asha)  # what tuner.pkl holds: written before any result
    for i in range(3):
        t = _trial(f"t{i}")
        asha.on_trial_add(None, t)
        asha.on_trial_result(None, t, {"epoch": 2, "val_top1": 0.5 + 0.1 * i})
    restored = pickle.loads(blob)
    assert dict(restored.rungs)[2] == {"t0": 0.5, "t1": 0.6, "t2": pytest.approx(0.7)}
    late = _trial("late")
    restored.on_trial_add(None, late)
    assert restored.on_trial_result(None, late, {"epoch": 2, "val_top1": 0.55}) == TrialScheduler.STOP


# -- the searcher -------------------------------------------------------------------------------------


def _searcher(space_dict: dict, storage=None, fresh: bool = True) -> LtOptunaSearch:
    space = parse_space(space_dict, "x.yaml")
    return LtOptunaSearch(space=space.define_by_run(), metric=space.searcher_metric, mode=space.searcher_mode,
                          points_to_evaluate=[space.published_point()] if fresh else None,
                          sampler=optuna.samplers.RandomSampler(seed=0), study_name="s",
                          storage=storage or optuna.storages.InMemoryStorage())


SPACE = {"method": "ce", "tune": {"lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}}


def test_published_point_is_marked_and_a_pruned_trial_carries_the_value_it_was_stopped_on():
    s = _searcher(SPACE)
    first, second, third = (s.suggest(t) for t in ("a", "b", "c"))
    assert first[PUBLISHED_KEY] is True and PUBLISHED_KEY not in second
    s.on_trial_result("b", {"epoch": 1, "val_top1": 0.3, "epochs_total": 4})
    # Tune withholds the result a STOP decision was made on: on_trial_complete brings it
    s.on_trial_complete("b", {"epoch": 2, "val_top1": 0.4, "epochs_total": 4})
    s.on_trial_complete("c", {"epoch": 4, "val_top1": math.nan, "epochs_total": 4})
    s.on_trial_complete("a", {"epoch": 4, "val_top1": 0.6, "epochs_total": 4})
    trials = {t.number: t for t in s._ot_study.get_trials()}
    assert trials[1].state == optuna.trial.TrialState.PRUNED
    assert trials[1].intermediate_values == {1: 0.3, 2: 0.4} and trials[1].value == 0.4
    assert trials[2].state == optuna.trial.TrialState.FAIL  # NaN objective
    assert trials[0].state == optuna.trial.TrialState.COMPLETE and trials[0].value == 0.6


def test_multi_objective_trials_are_told_both_values():
    s = _searcher({**SPACE, "metric": ["val_top1", "val_few"], "mode": ["max", "max"]})
    s.suggest("a")
    s.on_trial_result("a", {"epoch": 1, "val_top1": 0.3, "val_few": 0.1, "epochs_total": 2})
    s.on_trial_complete("a", {"epoch": 2, "val_top1": 0.5, "val_few": 0.2, "epochs_total": 2})
    (t,) = s._ot_study.get_trials()
    assert t.values == [0.5, 0.2] and t.intermediate_values == {}


def test_restore_fails_optuna_trials_no_tune_trial_owns(tmp_path):
    storage = open_optuna_storage(str(tmp_path / "optuna.journal"))  # what studies use: shared, not copied
    s = _searcher(SPACE, storage)
    s.suggest("a")
    s.save(str(tmp_path / "searcher.pkl"))  # Tune's last experiment-state save
    s.suggest("b")  # asked just before the driver was killed: no saved state knows it
    restored = _searcher(SPACE, storage, fresh=False)
    restored.restore(str(tmp_path / "searcher.pkl"))
    states = {t.number: t.state for t in restored._ot_study.get_trials()}
    assert states == {0: optuna.trial.TrialState.RUNNING, 1: optuna.trial.TrialState.FAIL}


def test_a_told_trial_leaves_the_searcher_state_tune_pickles_at_every_save(tmp_path):
    """The searcher's pickle (written at every experiment save) holds the running trials, not every trial so
    far; a late result or a second end of a told trial changes nothing, and a restore fails no told trial."""
    storage = open_optuna_storage(str(tmp_path / "optuna.journal"))
    s = _searcher(SPACE, storage)
    s.suggest("a")
    s.save(str(tmp_path / "one.pkl"))
    for i in range(30):
        s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", {"epoch": 2, "val_top1": 0.1 * (i % 7), "epochs_total": 2})
    s.save(str(tmp_path / "many.pkl"))
    assert set(s._ot_trials) == {"a"} and len(s._completed_trials) == 30
    assert (tmp_path / "many.pkl").stat().st_size < 2 * (tmp_path / "one.pkl").stat().st_size
    s.on_trial_result("t3", {"epoch": 2, "val_top1": 0.9, "epochs_total": 2})
    s.on_trial_complete("t3", {"epoch": 2, "val_top1": 0.9, "epochs_total": 2})
    restored = _searcher(SPACE, storage, fresh=False)
    restored.restore(str(tmp_path / "many.pkl"))
    states = [t.state for t in restored._ot_study.get_trials()]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 30 and optuna.trial.TrialState.FAIL not in states
    assert restored._ot_study.trials[4].value == pytest.approx(0.3)  # t3, told once


def test_startup_trials_scale_with_the_budget_and_seeds_come_from_the_name():
    assert [startup_trials(n) for n in (4, 8, 16, 40, 200)] == [2, 2, 4, 10, 10]
    assert make_sampler("tpe", 1, 16)._n_startup_trials == 4
    assert "close to a random search" in sampler_warning("tpe", 8) and sampler_warning("tpe", 16) is None
    assert sampler_warning("random", 4) is None
    assert study_seed("a") == study_seed("a") != study_seed("b")


# -- options, outcome, selection ---------------------------------------------------------------------


def test_resume_reuses_saved_options_and_refuses_a_conflicting_flag():
    started = StudyOptions(method="ce", num_trials=32, workers=2, fixed={"epochs": 3})
    saved = started.saved()
    resumed = StudyOptions(method="ce", study_name="s", resume=True, max_concurrent=4,
                           given=frozenset({"method"})).for_resume(saved)
    assert (resumed.num_trials, resumed.workers, resumed.fixed, resumed.max_concurrent) == (32, 2,
                                                                                               {"epochs": 3}, 4)
    with pytest.raises(ConfigError, match="--workers 1 differs from the study's saved 2"):
        StudyOptions(method="ce", workers=1, given=frozenset({"workers"})).for_resume(saved)
    assert parse_duration("90m") == 5400 and parse_duration("2h") == 7200 and parse_duration("30") == 30
    with pytest.raises(ConfigError, match="--time-budget"):
        parse_duration("soon")


def test_outcome_of_a_trial():
    done = {"epoch": 4, "epochs_total": 4, "val_top1": 0.5}
    assert trial_outcome(done, False, ("val_top1",)) == ("completed", None)
    assert trial_outcome({**done, "epoch": 2}, False, ("val_top1",))[0] == "pruned"
    assert trial_outcome({**done, "val_top1": math.nan}, False, ("val_top1",)) == (
        "failed", "objective val_top1 is nan at the last epoch")
    assert trial_outcome(done, True) == ("failed", None)


def _t(tid, status="completed", published=False, **metrics):
    return {"trial_id": tid, "status": status, "metrics": metrics, "published": published}


def test_selection_best_pareto_and_pick_rules():
    obj = Objectives(("val_top1",), ("max",))
    trials = [_t("a", val_top1=0.5), _t("b", "pruned", val_top1=0.9), _t("c", val_top1=0.6)]
    assert pick_best(trials, obj)["trial_id"] == "c"  # a pruned trial is not a candidate
    two = Objectives(("val_top1", "val_few"), ("max", "max"))
    trials = [_t("a", val_top1=0.8, val_few=0.1), _t("b", val_top1=0.7, val_few=0.3),
              _t("c", val_top1=0.6, val_few=0.2), _t("d", val_top1=0.5, val_few=0.4)]
    assert [t["trial_id"] for t in pareto_front(trials, two)] == ["a", "b", "d"]  # c is dominated by b
    assert pick_point(trials, two, "1")["trial_id"] == "b"
    assert pick_point(trials, two, "max val_top1 where val_few >= 0.25")["trial_id"] == "b"
    with pytest.raises(ConfigError, match="choose one with --pick"):
        pick_point(trials, two, None)
    with pytest.raises(ConfigError, match="no Pareto point satisfies"):
        pick_point(trials, two, "max val_top1 where val_few >= 0.9")


def test_confirmed_ranking_uses_the_mean_over_seeds():
    obj = Objectives(("val_top1",), ("max",))
    runs = [{"confirms": "a", "seed": s, "status": "completed", "metrics": {"val_top1": v}}
            for s, v in ((1, 0.9), (2, 0.3))]
    runs += [{"confirms": "b", "seed": s, "status": "completed", "metrics": {"val_top1": v}}
             for s, v in ((1, 0.6), (2, 0.65))]
    runs.append({"confirms": "b", "seed": 3, "status": "failed", "metrics": {}})
    ranking = confirmed_ranking(runs, obj)
    assert [r["trial_id"] for r in ranking] == ["b", "a"] and ranking[0]["seeds"] == [1, 2]
    assert ranking[1]["mean"] == pytest.approx(0.6) and ranking[1]["std"] == pytest.approx(0.4242640)


def test_a_study_whose_start_failed_can_start_again_under_its_name(tmp_path):
    from ltstudy.study.tracking.store import TrackingError
    from ltstudy.study.tracking.study_run import StudyTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = StudyTracker(uri, "s").open({"ltstudy.method": "ce"}, resume=False)  # then Ray never started
    again = StudyTracker(uri, "s")
    second = again.open({"ltstudy.method": "ce"}, resume=False)
    assert second != first and again.mlc.get_run(first).info.lifecycle_stage == "deleted"
    again.mlc.create_run(again.experiment_id, tags={"mlflow.parentRunId": second, "ltstudy.role": "trial"})
    with pytest.raises(TrackingError, match="already has trial runs"):
        StudyTracker(uri, "s").open({}, resume=False)
