"""The figures of a study and of ``compare``, as PNG bytes (matplotlib, Agg; no display needed).

* :func:`optuna_pngs`: Optuna's own history, importance, slice, contour, parallel-coordinate and
  intermediate-value plots (``optuna.visualization.matplotlib``), so the MLflow run and the HTML
  report show what optuna-dashboard shows. A plot Optuna cannot draw yet (too few trials, one tuned
  parameter) becomes a figure that says why, never a missing file.
* :func:`study_pngs`: those plots and the best-vs-published accuracy per class, from a study's records.
* :func:`bucket_png`: ``compare``'s per-bucket accuracy by method, mean ± std over seeds.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from ltstudy.study.results.selection import published_trial
from ltstudy.study.tracking.dataset import record_from_run
from ltstudy.study.tracking.figures import (
    message_png,
    per_class_png,
    plain_style,
    png_bytes,
    pyplot,
    reliability_png,
)
from ltstudy.study.tracking.records import per_class_of, reliability_of_run
from ltstudy.study.tracking.store import STUDY_TAG

#: the Optuna plots logged on every study run, in the order the report shows them
OPTUNA_PLOTS = ("optimization_history", "param_importances", "slice", "contour", "parallel_coordinate",
                "intermediate_values")
#: at most this many parameters (the most important) in the contour grid: k parameters draw k x k panels
CONTOUR_PARAMS = 3
#: a legend with more entries is dropped: Optuna's intermediate-values plot names every trial, and a
#: 1,000-entry legend took 5.5 of the report's 21 s to draw while nobody can read it
LEGEND_MAX = 20


def importances(study: Any, metric: str) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances (its default evaluator), or ``({}, why not)``.

    Optuna warns and returns equal importances when too few trials completed; that is reported as no
    importances rather than as a misleading flat bar chart.
    """
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


class _Computed(optuna.importance.BaseImportanceEvaluator):
    """Importances already computed, handed to Optuna's importance plot so that it does not evaluate them a
    second time (fANOVA over 1,000 trials: 1.4 s of the report)."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def evaluate(self, study: Any, params: list[str] | None = None, *, target: Any = None) -> dict[str, float]:
        return {k: v for k, v in self.values.items() if params is None or k in params}


def _axes_figure(result: Any):
    first = np.asarray(result, dtype=object).flat[0]
    return first.figure


def optuna_pngs(study: Any, metric: str, imp: dict[str, float] | None = None) -> dict[str, bytes]:
    """Every plot of :data:`OPTUNA_PLOTS` for ``study`` (``imp``: importances already computed)."""
    pyplot()  # Agg first: Optuna's matplotlib module imports pyplot
    import optuna.visualization.matplotlib as ovm  # here, after the backend is set

    if imp is None:
        imp, why = importances(study, metric)
    else:
        why = None if imp else "too few completed trials for importances"
    top = list(imp)[:CONTOUR_PARAMS] or None
    draw: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, target_name=metric),
        "param_importances": lambda: ovm.plot_param_importances(study, evaluator=_Computed(imp), target_name=metric),
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
        _drop_long_legends(fig)
        out[name] = png_bytes(fig)
    return out


def _drop_long_legends(fig) -> None:
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None and len(legend.get_texts()) > LEGEND_MAX:
            legend.remove()
            ax.set_title(f"{ax.get_title()} ({len(legend.get_texts())} trials; legend omitted)")


def bucket_png(rows: dict[str, dict[str, tuple[float, float]]], split: str = "test") -> bytes:
    """Grouped bars: top-1 / many / medium / few accuracy (%) per method, mean ± std over seeds."""
    plt = pyplot()
    with plain_style():
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
        return png_bytes(fig)


def study_pngs(mlc, parent: Any, trials: list[dict[str, Any]], metric: str, optuna_study: Any,
               best: dict[str, Any] | None) -> tuple[dict[str, bytes], dict[str, float]]:
    """Every figure of a study (the Optuna plots, the best-vs-published per-class and reliability plots) and
    the parameter importances, from its records. The trials' own runs hold the data (per-class accuracy
    and calibration bins as JSON), not figures."""
    if optuna_study is not None:
        imp, _ = importances(optuna_study, metric)
        pngs = optuna_pngs(optuna_study, metric, imp)
    else:
        imp = {}
        pngs = {n: message_png(n.replace("_", " "), "the Optuna study is not available") for n in OPTUNA_PLOTS}
    series = {}
    published = published_trial(trials)
    best_label = best.get("number") if best and best.get("number") is not None else (best or {}).get("trial_id")
    picks = [(f"best (trial {best_label})", best)] if best else []
    if published is not None and (best is None or published["run_id"] != best["run_id"]):
        picks.append(("published (trial 0)", published))
    elif best is not None and published is not None:
        picks = [("best = published (trial 0)", best)]
    found = [(label, per_class_of(mlc, t["run_id"])) for label, t in picks]
    found = [(label, pc) for label, pc in found if pc]
    split = "test" if found and all("test_per_class" in pc for _, pc in found) else "val"
    for label, pc in found:
        if f"{split}_per_class" in pc:
            series[f"{label}, {split}"] = pc[f"{split}_per_class"]
    data = record_from_run(parent)
    if series and data:
        pngs["per_class_best_vs_published"] = per_class_png(
            data["class_counts"], series, f"{parent.data.tags.get(STUDY_TAG, '')}: accuracy per class, "
            f"best vs published", data.get("many_threshold", 100), data.get("few_threshold", 20),
            data.get("class_names"))
    else:
        pngs["per_class_best_vs_published"] = message_png(
            "accuracy per class", "no finished trial with per-class accuracy" if data else
            "the study run has no dataset record (class counts)")
    reliability = {}
    for label, t in picks:
        if bins := reliability_of_run(mlc, t["run_id"]):
            reliability[f"{label}, {'test' if 'test' in bins else 'val'}"] = bins["test" if "test" in bins else "val"]
    if reliability:  # a study whose trials record calibration bins (every image and feature method does)
        pngs["reliability_best_vs_published"] = reliability_png(reliability, "reliability, best vs published")
    return pngs, imp


def log_pngs(mlc, run_id: str, pngs: dict[str, bytes], folder: str = "plots") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, png in pngs.items():
            path = Path(tmp) / f"{name}.png"
            path.write_bytes(png)
        mlc.log_artifacts(run_id, tmp, folder)
