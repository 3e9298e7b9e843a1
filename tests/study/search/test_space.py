"""Search-space files: every shipped file validates; bad files fail with one precise line."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from ltstudy.config import resolve_config
from ltstudy.data import FAMILIES
from ltstudy.methods import get_method, list_methods
from ltstudy.study.options import StudyOptions
from ltstudy.study.plan import schedule_budget
from ltstudy.study.search.space import SpaceError, default_space_path, load_space, parse_space

ROOT = Path(__file__).resolve().parents[3]
LR = {"lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_expected_files_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert set(list_methods()) <= names, "every registered method ships a search space"
    families = {p.stem.split(".", 1)[1] for p in SHIPPED if "." in p.stem}
    assert {p.stem.split(".")[0] for p in SHIPPED} == set(list_methods()) and families <= set(FAMILIES)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_space_validates(path):
    method, _, family = path.stem.partition(".")
    space = load_space(path, method=method)
    assert space.method == method
    if family:
        assert space.fixed["dataset"] == FAMILY_PINS[family]["dataset"]
    point = space.published_point()
    assert set(point) <= set(space.tuned_names)
    resolve_config({**space.fixed, **point, "method": space.method})
    schedule_budget(space, StudyOptions(method=space.method))  # plannable with early stopping on


#: what a study of each family pins (MetaSAug's file-list recipe trains the classifier of a given backbone)
FAMILY_PINS = {"cifar10": {"dataset": "cifar10-lt"}, "cifar100": {"dataset": "cifar100-lt"},
               "imagenet": {"dataset": "filelist", "backbone": "/stage1/checkpoint.pt"}}


@pytest.mark.parametrize("family", list(FAMILY_PINS))
@pytest.mark.parametrize("method", list_methods())
def test_the_first_trial_of_a_study_is_the_familys_published_recipe(method, family):
    """The space a study of this dataset picks holds the family's recipe, and its first trial is that recipe."""
    pins = FAMILY_PINS[family]
    space = load_space(default_space_path(method, pins["dataset"]), method).with_fixed(pins)
    first = resolve_config({**space.fixed, **space.published_point(), "method": method}).to_dict()
    recipe = get_method(method).recipe(family).resolved(100.0)
    for key, value in recipe.items():
        assert first[key] == (list(value) if isinstance(value, tuple) else value), key


def test_published_point_is_method_defaults():
    space = load_space(ROOT / "search_spaces" / "ldam_drw.yaml")
    assert space.published_point() == {"lr": 0.1, "weight_decay": 2e-4, "max_m": 0.5, "s": 30.0,
                                       "drw_start": 0.8}


def test_define_by_run_conditional_and_constants():
    space = load_space(ROOT / "search_spaces" / "ce.yaml").with_fixed({"epochs": 3})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    fn = space.define_by_run()
    seen = set()
    for _ in range(30):
        trial = study.ask()
        constants = fn(trial)
        assert constants["epochs"] == 3 and constants["method"] == "ce"
        assert ("sampler_q" in trial.params) == (trial.params["sampler"] == "power")
        seen.add(trial.params["sampler"])
        resolve_config({**constants, **trial.params})
        study.tell(trial, 0.0)
    assert seen == {"instance", "sqrt", "power"}


def test_override_of_tuned_name_pins_it():
    space = load_space(ROOT / "search_spaces" / "ce.yaml").with_fixed({"lr": 0.05})
    assert "lr" not in space.tuned_names and space.fixed["lr"] == 0.05


@pytest.mark.parametrize("tune, message", [
    ({"not_a_param": {"type": "float", "low": 0, "high": 1}}, "not a hyperparameter"),
    ({"lr": {"type": "float", "low": 0.5, "high": 0.1}}, "low (0.5) > high (0.1)"),
    ({"lr": {"type": "float", "low": 0.0, "high": 0.5, "log": True}}, "log scale needs low > 0"),
    ({"lr": {"type": "float", "low": 0.2, "high": 0.5}}, "published value lr = 0.1 lies outside"),
    ({"lr": {"type": "normal", "low": 0.01, "high": 0.5}}, "type must be"),
    ({"sampler_q": {"type": "float", "low": 0, "high": 1, "when": {"sampler": "power"}}}, "not a tuned"),
    ({"sampler": {"type": "categorical", "choices": ["instance", "bogus"]}}, "bogus"),
])
def test_bad_spaces(tune, message):
    with pytest.raises(SpaceError, match=None) as err:
        parse_space({"method": "ce", "tune": tune}, "x.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_wrong_method_and_metric():
    with pytest.raises(SpaceError, match="for method 'ce', not 'ldam_drw'"):
        parse_space({"method": "ce", "tune": LR}, "x.yaml", method="ldam_drw")
    with pytest.raises(SpaceError, match="metric must be one of"):
        parse_space({"method": "ce", "metric": "test_top1", "tune": LR}, "x.yaml")


def test_multi_objective_spaces():
    space = parse_space({**{"method": "ce", "tune": LR}, "metric": ["val_top1", "val_few"], "mode": "max"}, "x")
    assert space.metrics == ("val_top1", "val_few") and space.modes == ("max", "max") and space.multi_objective
    assert space.searcher_metric == ["val_top1", "val_few"] and space.metric == "val_top1"
    for metric, mode, message in ((["val_top1"] * 2, "max", "2 or 3 different"),
                                  (["val_top1", "val_few"], ["max"], "one of them per metric"),
                                  (["val_top1", "test_top1"], "max", "must be one of")):
        with pytest.raises(SpaceError, match=message):
            parse_space({"method": "ce", "tune": LR, "metric": metric, "mode": mode}, "x")
