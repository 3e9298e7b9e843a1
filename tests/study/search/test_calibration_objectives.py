"""Calibration as a study objective: ``val_ece`` (and per bucket, ``val_nll``) minimised, alone or against
accuracy in a multi-objective study."""

from __future__ import annotations

import pytest

from ltstudy.study.search.space import SpaceError, parse_space

LR = {"lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}


def test_val_ece_is_a_minimised_objective():
    space = parse_space({"method": "ce", "metric": "val_ece", "mode": "min", "tune": LR})
    assert space.metrics == ("val_ece",) and space.modes == ("min",)
    with pytest.raises(SpaceError, match="val_ece_few is a calibration error, lower is better: its mode is min"):
        parse_space({"method": "ce", "metric": "val_ece_few", "mode": "max", "tune": LR})


def test_accuracy_against_ece_is_a_two_objective_study():
    space = parse_space({"method": "lift", "metric": ["val_top1", "val_ece"], "mode": ["max", "min"], "tune": LR})
    assert space.multi_objective and space.searcher_metric == ["val_top1", "val_ece"]
    assert space.searcher_mode == ["max", "min"]
