"""``ltstudy bench stopping``: does early stopping earn its keep? Successive halving against no stopping at
equal total epochs, over several study seeds.

For each study seed, two real ``ltstudy tune`` processes (:func:`~ltstudy.experiments.bench_study.tune_process`)
with the random sampler on that seed: ``--scheduler halving`` over ``configs`` configurations, and
``--scheduler none`` over as many configurations as the same epochs buy at the full recipe. Both confirm
their best full-budget trial and the published one on ``confirm_seeds`` new seeds (paired). Per study: the
epochs spent (search; confirmation apart), the confirmed winner's mean validation objective with its 95 %
t-interval, its mean test value over the confirmation seeds (reported only, never selected on), and the
paired gain over the published configuration.

Rank correlation between budgets: the random sampler on one seed draws the same configurations in the same
order in both studies, so the first ones have a value at the shortest budget (halving) and at the full
recipe (no stopping); the Spearman coefficient over those pairs, pooled over the seeds, says how well the
short runs rank configurations.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from ltstudy.study.search.halving import ladder, total_epochs


def _records(root: Path, name: str, metric: str) -> dict[str, Any]:
    from ltstudy.study.results.selection import Objectives, recommended
    from ltstudy.study.tracking.records import find_study, study_trials

    mlc, exp, parent = find_study(f"sqlite:///{root / 'mlflow.db'}", name)
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    confirmations = study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation")
    obj = Objectives((metric,), ("max",))
    best = recommended(trials, confirmations, obj) or {}
    row = best.get("confirmed", {})
    test = "test_" + metric.removeprefix("val_")
    tests = [r["metrics"][test] for r in confirmations if r["confirms"] == best.get("trial_id")
             and r["status"] == "completed" and test in r["metrics"]]
    return {"trials": len(trials), "epochs": sum(int(t["params"].get("epochs", 0)) for t in trials),
            "confirm_epochs": sum(int(r["params"].get("epochs", 0)) for r in confirmations),
            "best_trial": best.get("trial_id"), "val": row.get("mean"), "val_ci95": row.get("ci95"),
            "test": statistics.fmean(tests) if tests else None, "gain": row.get("diff"),
            "gain_ci95": row.get("diff_ci95"), "published_best": best.get("published", False),
            "by_number": {t["number"]: (t["metrics"].get(metric), t.get("budget")) for t in trials
                          if t["number"] is not None}}


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation of (short-budget value, full-budget value) pairs (None below three pairs
    or when one side is all ties: no ranking to correlate)."""
    from scipy import stats

    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    return float(stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic)


def short_full_pairs(halving: dict[str, Any], none: dict[str, Any]) -> list[tuple[float, float]]:
    """The configurations both studies drew (same Optuna number among the first-budget trials): the value
    of each at halving's shortest budget and at the full recipe."""
    from ltstudy.study.tracking.records import is_partial

    short = {n: v for n, (v, budget) in halving["by_number"].items() if is_partial(budget) and v is not None}
    return [(short[n], v) for n, (v, _) in none["by_number"].items() if n in short and v is not None]


def bench_stopping(method: str = "ldam_drw", epochs: int = 9, configs: int = 4, seeds: tuple[int, ...] = (0, 1, 2),
                   confirm_seeds: int = 3, metric: str = "val_top1", concurrent: int = 2,
                   flags: list[str] | None = None, overrides: list[str] | None = None,
                   plain_configs: int | None = None) -> dict[str, Any]:
    """Halving vs no stopping at equal total epochs, one pair of studies per seed (see the module doc);
    ``plain_configs``: no stopping over that many configurations instead (``configs``: the same ones as
    halving, each at the full recipe -- what halving's saving is measured against)."""
    from ltstudy.experiments.bench_study import tune_process

    budgets = ladder(epochs, configs)
    # configurations the same epochs buy at the full recipe
    plain = plain_configs or max(1, total_epochs(budgets) // epochs)
    rows, pairs = [], []
    with tempfile.TemporaryDirectory(prefix="ltstudy-bench-") as tmp:
        root = Path(tmp)
        for seed in seeds:
            got = {}
            for arm, n in (("halving", configs), ("none", plain)):
                name = f"stop-{arm}-{seed}"
                wall = tune_process(root, name, [
                    "--method", method, "--num-trials", str(n), "--scheduler", arm, "--sampler", "random",
                    "--seed", str(seed), "--max-concurrent", str(concurrent), "--retries", "0",
                    "--confirm", "1", "--confirm-seeds", str(confirm_seeds), *(flags or []),
                    *(overrides or []), f"epochs={epochs}"])
                got[arm] = _records(root, name, metric)
                rows.append({"seed": seed, "scheduler": arm, "configs": n, "wall_s": wall,
                             **{k: v for k, v in got[arm].items() if k != "by_number"}})
            pairs += short_full_pairs(got["halving"], got["none"])
    return {"rows": rows, "spearman": spearman(pairs), "pairs": pairs, "budgets": budgets, "plain": plain}
