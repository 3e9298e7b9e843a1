"""The figures of a study and of ``compare``, as PNG bytes (matplotlib, Agg; no display needed).

* :func:`per_class_png`: accuracy per class against the class's training frequency, head to tail
  (classes sorted by training count, the count on a log-scale twin axis, many/medium/few bands): the
  picture long-tail papers look at first. Logged on every finished trial and, best vs published, on
  the study run.
* :func:`optuna_pngs`: Optuna's own history, importance, slice, contour, parallel-coordinate and
  intermediate-value plots (``optuna.visualization.matplotlib``), so the MLflow run and the HTML
  report show what optuna-dashboard shows. A plot Optuna cannot draw yet (too few trials, one tuned
  parameter) becomes a figure that says why, never a missing file.
* :func:`bucket_png`: ``compare``'s per-bucket accuracy by method, mean ± std over seeds.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

#: the Optuna plots logged on every study run, in the order the report shows them
OPTUNA_PLOTS = ("optimization_history", "param_importances", "slice", "contour", "parallel_coordinate",
                "intermediate_values")
#: at most this many parameters (the most important) in the contour grid: k parameters draw k x k panels
CONTOUR_PARAMS = 3
_BANDS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain():
    """Matplotlib's default style: ``optuna.visualization.matplotlib`` switches the global style to ggplot."""
    return _pyplot().style.context("default")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def message_png(title: str, text: str) -> bytes:
    """A small figure that says why a plot could not be drawn (kept so every plot name has a file)."""
    plt = _pyplot()
    with _plain():
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
        ax.set_axis_off()
        ax.set_title(title)
        return _png(fig)


def buckets_of(counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """many (n > ``many``) / medium / few (n < ``few``) for each class, as :mod:`ltstudy.metrics`."""
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]


def per_class_png(class_counts: Sequence[int], series: dict[str, Sequence[float]], title: str,
                  many: int = 100, few: int = 20, class_names: Sequence[str] | None = None) -> bytes:
    """Accuracy (%) per class, classes sorted head to tail by training count; one line per series."""
    plt = _pyplot()
    with _plain():
        counts = [int(n) for n in class_counts]
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        x = list(range(len(order)))
        fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 0.09 * len(order) + 5)), 4.2))
        ax2 = ax.twinx()
        ax2.bar(x, [counts[c] for c in order], color="0.75", width=0.8, label="training images")
        ax2.set_yscale("log")
        ax2.set_ylabel("training images (log scale)")
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        groups = buckets_of([counts[c] for c in order], many, few)
        for bucket, colour in _BANDS.items():
            idx = [i for i, g in enumerate(groups) if g == bucket]
            if idx:
                ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color=colour, alpha=0.07, lw=0)
                ax.text((min(idx) + max(idx)) / 2, 101, f"{bucket} ({len(idx)})", ha="center", va="bottom",
                        color=colour, fontsize=9, clip_on=False)
        marker = "o" if len(order) <= 40 else None
        for label, values in series.items():
            ys = [100 * v if v is not None and not math.isnan(v) else math.nan for v in values]
            ax.plot(x, [ys[c] for c in order], marker=marker, ms=4, lw=1.4, label=label)
        ax.set_ylim(0, 108)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylabel("accuracy (%)")
        ax.set_xlabel("class, head → tail (sorted by training images)")
        if class_names is not None and len(order) <= 20:
            ax.set_xticks(x, [str(class_names[c]) for c in order], rotation=45, ha="right", fontsize=8)
        elif len(order) <= 20:
            ax.set_xticks(x, [str(c) for c in order])
        below = -0.3 if len(order) <= 20 else -0.15  # under the (rotated) class names
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=min(len(series), 3), fontsize=8,
                  frameon=False)
        ax.set_title(title, fontsize=10, pad=16)
        return _png(fig)


def importances(study: Any, metric: str) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (its default evaluator), or ``({}, why not)``.

    Optuna warns and returns equal importances when too few trials completed; that is reported as no
    importances rather than as a misleading flat bar chart.
    """
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, f"{len(complete)} completed trial(s): importances need at least 2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = dict(optuna.importance.get_param_importances(study))
        except (ValueError, RuntimeError) as exc:
            return {}, f"Optuna could not compute importances: {exc}"
    if any("importances will be equal" in str(w.message) for w in caught):
        return {}, f"{len(complete)} completed trials are too few for importances"
    return values, None


def _axes_figure(result: Any):
    import numpy as np

    first = np.asarray(result, dtype=object).flat[0]
    return first.figure


def optuna_pngs(study: Any, metric: str, imp: dict[str, float] | None = None) -> dict[str, bytes]:
    """Every plot of :data:`OPTUNA_PLOTS` for ``study`` (``imp``: importances already computed)."""
    import optuna
    import optuna.visualization.matplotlib as ovm

    if imp is None:
        imp, why = importances(study, metric)
    else:
        why = None if imp else "too few completed trials for importances"
    top = list(imp)[:CONTOUR_PARAMS] or None
    draw: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, target_name=metric),
        "param_importances": lambda: ovm.plot_param_importances(study, target_name=metric),
        "slice": lambda: ovm.plot_slice(study, target_name=metric),
        "contour": lambda: ovm.plot_contour(study, params=top, target_name=metric),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, target_name=metric),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    names = {n for t in complete for n in t.params}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "Param x unique value length is less than 2", ...
    try:
        return _draw_all(draw, imp, why, complete, names)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _draw_all(draw: dict[str, Callable[[], Any]], imp: dict[str, float], why: str | None, complete: list,
              names: set[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name in OPTUNA_PLOTS:
        title = name.replace("_", " ")
        if name == "param_importances" and not imp:
            out[name] = message_png(title, why or "no importances")
            continue
        if name != "intermediate_values" and not complete:
            out[name] = message_png(title, "no completed trial yet")
            continue
        if name == "contour" and len(names) < 2:
            out[name] = message_png(title, "a contour plot needs at least two tuned parameters")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fig = _axes_figure(draw[name]())
            except (ValueError, RuntimeError, IndexError) as exc:
                out[name] = message_png(title, f"Optuna could not draw it: {exc}")
                continue
        fig.set_size_inches(max(fig.get_size_inches()[0], 6.4), max(fig.get_size_inches()[1], 4.0))
        out[name] = _png(fig)
    return out


def bucket_png(rows: dict[str, dict[str, tuple[float, float]]], split: str = "test") -> bytes:
    """Grouped bars: top-1 / many / medium / few accuracy (%) per method, mean ± std over seeds."""
    import numpy as np

    plt = _pyplot()
    with _plain():
        buckets = ("top1", "many", "medium", "few")
        methods = list(rows)
        width = 0.8 / max(len(methods), 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(buckets) + 0.4 * len(methods)), 4))
        x = np.arange(len(buckets))
        for i, method in enumerate(methods):
            stats = [rows[method].get(f"{split}_{b}", (math.nan, math.nan)) for b in buckets]
            means = [100 * m if not math.isnan(m) else 0.0 for m, _ in stats]
            stds = [100 * s if not math.isnan(s) else 0.0 for _, s in stats]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=method)
        ax.set_xticks(x, ["top-1", "many", "medium", "few"])
        ax.set_ylabel(f"{split} accuracy (%), mean ± std over seeds")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, ncol=min(len(methods), 4))
        ax.set_title(f"{split} accuracy by bucket")
        return _png(fig)
