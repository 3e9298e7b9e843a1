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
