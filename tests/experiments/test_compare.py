"""``compare``: the mean ± std table over seeds behind the README's results."""

import math

import pytest

from ltstudy.experiments import compare as compare_module
from ltstudy.experiments.compare import COLUMNS, compare, markdown


def test_mean_and_sample_std_over_seeds_with_nan_left_out(monkeypatch):
    runs = {0: 0.2, 1: 0.4, 2: math.nan}

    def fake_run_trial(cfg, report=None, ctx=None):
        value = runs[cfg.train.seed]
        return {c: value for c in COLUMNS}

    monkeypatch.setattr(compare_module, "run_trial", fake_run_trial)
    seen = []
    rows = compare(["ce"], [0, 1, 2], {"dataset": "synthetic"}, on_run=lambda m, s, r: seen.append((m, s)))
    assert seen == [("ce", 0), ("ce", 1), ("ce", 2)]
    mean, std = rows["ce"]["val_top1"]
    assert mean == pytest.approx(0.3) and std == pytest.approx(0.1414213, rel=1e-5)  # n - 1 in the std
    table = markdown(rows)
    assert table.splitlines()[2].startswith("| ce | 30.0 ± 14.1 |")


def test_one_seed_has_zero_spread_and_an_all_nan_column_is_a_dash(monkeypatch):
    monkeypatch.setattr(compare_module, "run_trial",
                        lambda cfg, report=None, ctx=None: {c: (math.nan if c.endswith("few") else 0.5) for c in COLUMNS})
    rows = compare(["ce"], [0], {"dataset": "synthetic"})
    assert rows["ce"]["test_top1"] == (0.5, 0.0)
    cells = markdown(rows).splitlines()[2].split("|")
    assert cells[COLUMNS.index("val_few") + 2].strip() == "–"


def test_a_real_run(tmp_path):
    rows = compare(["ce"], [0], {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4,
                                 "epochs": 1, "device": "cpu", "batch_size": 64, "imbalance": 20})
    assert all(math.isfinite(rows["ce"][c][0]) for c in ("val_top1", "test_top1"))
