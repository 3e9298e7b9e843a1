"""A study read back from MLflow: its trial runs as plain records, a run's per-class accuracy, the
checkpoint of a finished trial. MLflow only, no Ray: what ``studies``, ``report`` and ``export`` read."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from ltstudy.errors import ConfigError
from ltstudy.study.tracking.store import (
    BUDGET_TAG,
    CHECKPOINT_TAG,
    CONFIRMS_TAG,
    NUMBER_TAG,
    PARENT_TAG,
    PUBLISHED_TAG,
    RELIABILITY_JSON,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TUNED_PREFIX,
    TrackingError,
    check_reachable,
    client,
    download_artifact,
    resolve_tracking_uri,
)


def study_trials(mlc, experiment_id: str, parent_run_id: str, role: str = "trial") -> list[dict[str, Any]]:
    """Every trial run (``role="confirmation"``: every confirmation run) of a study, oldest first."""
    runs = mlc.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                            f"tags.`{ROLE_TAG}` = '{role}'",
                           max_results=5000, order_by=["attributes.start_time ASC"])
    return [{"run_id": r.info.run_id, "trial_id": r.data.tags.get(TRIAL_TAG, ""),
             "status": r.data.tags.get(STATUS_TAG, "running"), "metrics": dict(r.data.metrics),
             "params": dict(r.data.params), "mlflow_status": r.info.status,
             "published": r.data.tags.get(PUBLISHED_TAG) == "true", "confirms": r.data.tags.get(CONFIRMS_TAG),
             "budget": r.data.tags.get(BUDGET_TAG), "partial": is_partial(r.data.tags.get(BUDGET_TAG)),
             "seed": r.data.tags.get("seed"), "error": r.data.tags.get("error"),
             "node_id": r.data.tags.get("node_id"),
             "number": int(r.data.tags[NUMBER_TAG]) if r.data.tags.get(NUMBER_TAG, "").isdigit() else None,
             "tuned": {k[len(TUNED_PREFIX):]: v for k, v in r.data.tags.items() if k.startswith(TUNED_PREFIX)},
             "tags": dict(r.data.tags), "start_time": r.info.start_time, "end_time": r.info.end_time}
            for r in runs]


def is_partial(budget: str | None) -> bool:
    """Whether a successive-halving run's budget (``epochs/full``) is less than the full recipe."""
    if not budget or "/" not in budget:
        return False
    run, full = budget.split("/", 1)
    return run != full


def status_counts(trials: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    return counts


def find_study(uri: str, study: str):
    """The experiment and parent run of a study, or a one-line error naming what is missing."""
    mlc = client(uri)
    exp = mlc.get_experiment_by_name(study)
    if exp is None or exp.tags.get(STUDY_TAG) != study:
        raise TrackingError(f"no ltstudy study named {study!r} in {uri}")
    runs = mlc.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'study'", max_results=1,
                           order_by=["attributes.start_time ASC"])
    if not runs:
        raise TrackingError(f"study {study!r} in {uri} has no study run")
    return mlc, exp, runs[0]


def per_class_of(mlc, run_id: str) -> dict[str, list[float]] | None:
    """A finished trial's ``per_class_accuracy.json`` (val and, after the last epoch, test)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(download_artifact(mlc, run_id, "per_class_accuracy.json", tmp)).read_text())
    except (MlflowException, TrackingError, OSError, ValueError):
        return None


def reliability_of_run(mlc, run_id: str) -> dict[str, Any] | None:
    """A finished trial's ``reliability.json`` (the bins of its last val and test evaluations)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(download_artifact(mlc, run_id, RELIABILITY_JSON, tmp)).read_text())
    except (MlflowException, TrackingError, OSError, ValueError):
        return None


def checkpoint_of_run(tracking_uri: str | None, run_id: str) -> str:
    """The checkpoint folder of a finished trial's MLflow run (tagged when the trial ended)."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri, existing=True)
    try:
        run = client(uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no MLflow run {run_id!r} in {uri}") from None
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise ConfigError(f"MLflow run {run_id} has no checkpoint (tag {CHECKPOINT_TAG}); "
                          "pass the checkpoint file instead")
    return path


def resolve_backbone(value: str, tracking_uri: str | None = None) -> str:
    """A checkpoint file or folder as given, or the checkpoint of the MLflow run with that id."""
    # torch comes with it: imported here, not by every reader of a study's records
    from ltstudy.features.extract import names_a_file

    if names_a_file(value):
        return str(Path(value).expanduser().resolve())
    return checkpoint_of_run(tracking_uri, value)
