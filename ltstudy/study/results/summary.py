"""What a finished study recommends, written onto its study run and returned for the command to print.

:func:`record_summary` puts the best trial (or the Pareto front), its gain over the published trial, the
space and the counts by status on the study run, then ends it; the figures are drawn once, by ``ltstudy
report``. :class:`StudySummary` is what ``ltstudy tune`` prints from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from ltstudy.study.results.selection import Objectives, gain_over_published, pareto_front, recommended
from ltstudy.study.tracking.records import status_counts, study_trials
from ltstudy.study.tracking.store import log_batch
from ltstudy.study.tracking.study_run import StudyTracker

SPACE_ARTIFACT = "search_space.yaml"


@dataclass(kw_only=True)
class StudySummary:
    study: str
    metric: str
    mode: str
    best: dict[str, Any] | None
    tuned: list[str]
    counts: dict[str, int]
    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    wall_s: float
    trial_wall_s: dict[str, float]
    trials: list[dict[str, Any]]
    metrics: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    front: list[dict[str, Any]] = field(default_factory=list)  # multi-objective: the Pareto front
    gain: dict[str, float] | None = None  # the best trial minus the published one
    confirmed: list[dict[str, Any]] = field(default_factory=list)  # confirmation ranking, best first
    notes: list[str] = field(default_factory=list)

    def failure(self) -> str | None:
        """One line when no trial completed (the study has no answer): when every trial failed, how many
        and the most common error."""
        if any(t["status"] == "completed" for t in self.trials):
            return None
        if not self.trials:
            return "no trial ran"
        if any(t["status"] != "failed" for t in self.trials):
            counts = ", ".join(f"{v} {k}" for k, v in sorted(status_counts(self.trials).items()))
            return f"no trial completed ({counts})"
        errors: dict[str, int] = {}
        for t in self.trials:
            errors[t.get("error") or "unknown error"] = errors.get(t.get("error") or "unknown error", 0) + 1
        common, n = max(errors.items(), key=lambda kv: kv[1])
        return f"all {len(self.trials)} trials failed; most common error ({n} of {len(self.trials)}): {common}"


def record_summary(tracker: StudyTracker, space_text: str, obj: Objectives, status: str = "FINISHED") -> dict[str, Any]:
    """Summarise the study onto its study run and end it; returns ``{"best", "front", "gain", "trials"}``."""
    mlc, run_id = tracker.mlc, tracker.parent_run_id
    trials = study_trials(mlc, tracker.experiment_id, run_id)
    best = recommended(trials, study_trials(mlc, tracker.experiment_id, run_id, "confirmation"), obj)
    front = pareto_front(trials, obj) if obj.multi else []
    gain = gain_over_published(trials, best, obj)
    mlc.log_text(run_id, space_text, SPACE_ARTIFACT)
    if best is not None:
        _log_best(mlc, run_id, best)
    if front:
        log_batch(mlc, run_id, tags={"ltstudy.pareto_trials": ",".join(t["trial_id"] for t in front)})
    now = int(time.time() * 1000)
    metrics = [Metric(f"gain_over_published.{k}", v, now, 0) for k, v in (gain or {}).items()]
    log_batch(mlc, run_id, metrics=metrics,
              tags={f"ltstudy.trials_{k}": v for k, v in status_counts(trials).items()})
    mlc.set_terminated(run_id, status)
    return {"best": best, "front": front, "gain": gain, "trials": trials}


def _log_best(mlc, run_id: str, best: dict[str, Any]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in best["metrics"].items()]
    tags = {"ltstudy.best_trial_id": best["trial_id"], "ltstudy.best_run_id": best["run_id"]}
    log_batch(mlc, run_id, metrics=metrics, tags=tags)
    try:
        log_batch(mlc, run_id, params=best["params"])
    except MlflowException:  # a resumed study whose best changed: params are immutable, keep tags
        log_batch(mlc, run_id, tags={f"best.{k}": v for k, v in best["params"].items()})
