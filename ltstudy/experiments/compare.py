"""Compare methods over seeds: the runs behind the README's results table.

``compare(methods, seeds, values)`` trains every (method, seed) pair with the same settings and returns
one row per method with the mean and standard deviation over seeds of the validation and test metrics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

from ltstudy.config import resolve_config
from ltstudy.train import TrialContext, run_trial

COLUMNS = [f"{split}_{m}" for split in ("val", "test") for m in ("top1", "many", "medium", "few")]


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def compare(methods: list[str], seeds: list[int], values: dict[str, Any],
            on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
            per_method: dict[str, dict[str, Any]] | None = None,
            checkpoint_root: str | None = None) -> dict[str, dict[str, tuple]]:
    """Mean ± std over ``seeds`` of :data:`COLUMNS` for each method; ``values`` apply to every run.

    ``per_method`` adds settings for one method only (e.g. a feature-stage method's ``backbone``);
    a value containing ``{seed}`` is formatted with the run's seed. With ``checkpoint_root`` each run
    keeps its final checkpoint in ``<root>/<method>-seed<seed>/`` (a backbone for feature-stage methods).
    """
    rows: dict[str, dict[str, tuple]] = {}
    for method in methods:
        runs = []
        for seed in seeds:
            extra = {k: v.format(seed=seed) if isinstance(v, str) else v
                     for k, v in {**values, **(per_method or {}).get(method, {})}.items()}
            ctx = TrialContext(checkpoint_dir=f"{checkpoint_root}/{method}-seed{seed}"
                               if checkpoint_root else None)
            metrics = run_trial(resolve_config({**extra, "method": method, "seed": seed}), ctx=ctx)
            runs.append(metrics)
            if on_run is not None:
                on_run(method, seed, metrics)
        rows[method] = {c: mean_std([r[c] for r in runs]) for c in COLUMNS}
    return rows


def markdown(rows: dict[str, dict[str, tuple]]) -> str:
    """The rows as a Markdown table, accuracies in % as mean ± std."""
    head = "| method | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for method, row in rows.items():
        cells = ["–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in row.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
