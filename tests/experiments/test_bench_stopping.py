"""``bench stopping``'s arithmetic: which runs pair up across budgets, and their rank correlation."""

from __future__ import annotations

import pytest

from ltstudy.experiments.bench_stopping import short_full_pairs, spearman


def test_pairs_join_the_shortest_budget_of_halving_to_the_full_runs_by_optuna_number():
    halving = {"by_number": {0: (0.30, "3/9"), 1: (0.20, "3/9"), 2: (0.25, "3/9"), 3: (0.10, "3/9"),
                             4: (0.50, "9/9"), 5: (0.40, "9/9")}}  # 4 and 5: promotions, not first draws
    none = {"by_number": {0: (0.60, None), 1: (0.35, None), 2: (0.45, None)}}
    pairs = short_full_pairs(halving, none)
    assert sorted(pairs) == [(0.20, 0.35), (0.25, 0.45), (0.30, 0.60)]
    assert spearman(pairs) == pytest.approx(1.0)
    assert spearman([(0.1, 0.3), (0.2, 0.2), (0.3, 0.1)]) == pytest.approx(-1.0)
    assert spearman([(0.1, 0.3), (0.1, 0.2), (0.1, 0.1)]) is None  # all tied at the short budget
    assert spearman(pairs[:2]) is None


def test_the_studies_get_the_backbone_instead_of_the_dataset_and_as_many_plain_configurations_as_asked(
        monkeypatch, tmp_path):
    """A feature-stage method's two studies tune on the backbone's cached features (its data are the study's);
    ``--plain-configs`` sets the no-stopping study's size (27: the same configurations as halving's)."""
    import ltstudy.experiments.bench_stopping as bench
    import ltstudy.experiments.bench_study as study
    from ltstudy.cli import main

    runs = []
    monkeypatch.setattr(study, "tune_process", lambda root, name, flags: runs.append((name, flags)) or 1.0)
    monkeypatch.setattr(bench, "_records", lambda root, name, metric: {
        "trials": 1, "epochs": 1, "confirm_epochs": 0, "best_trial": "t", "val": 0.5, "val_ci95": 0.0,
        "test": 0.5, "gain": 0.0, "gain_ci95": 0.0, "published_best": True, "by_number": {}})
    with pytest.raises(SystemExit) as done:
        main(["bench", "stopping", "-m", "tailcalibx", "--backbone", "bb/checkpoint.pt", "--epochs", "150",
              "--configs", "27", "--plain-configs", "27", "--seeds", "0", "--confirm-seeds", "2"])
    assert done.value.code == 0
    (halving, h), (none, n) = runs
    assert (halving, none) == ("stop-halving-0", "stop-none-0")
    for flags in (h, n):
        assert flags[flags.index("--backbone") + 1] == "bb/checkpoint.pt" and "--dataset" not in flags
        assert "epochs=150" in flags
    assert n[n.index("--num-trials") + 1] == "27" == h[h.index("--num-trials") + 1]
