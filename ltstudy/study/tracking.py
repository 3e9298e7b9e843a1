"""MLflow for studies (MLflow only, no Ray): the study (parent) run, reading trials back, export, figures.

Listing, showing and deleting studies is :mod:`ltstudy.study.catalog`.

The Tune side, which writes one child run per trial, is :mod:`ltstudy.study.callbacks`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ltstudy.errors import ConfigError, LtstudyError
from ltstudy.study.selection import (
    Objectives,
    confirmed_ranking,
    gain_over_published,
    pareto_front,
    pick_best,
    pick_point,
)

STUDY_TAG = "ltstudy.study"
ROLE_TAG = "ltstudy.role"
TRIAL_TAG = "ltstudy.trial_id"
STATUS_TAG = "ltstudy.status"  # completed | pruned | failed | running | interrupted
PUBLISHED_TAG = "ltstudy.published"  # "true" on the published configuration's trial run
CONFIRMS_TAG = "ltstudy.confirms"  # on a confirmation run: the trial id it re-runs with another seed
ENDED = ("completed", "pruned", "failed")  # statuses of a trial run that must never be touched again
CHECKPOINT_TAG = "ltstudy.checkpoint"  # where the trial's last checkpoint lives (storage URI)
PARENT_TAG = "mlflow.parentRunId"
TUNED_PREFIX = "tuned."  # ``tuned.<name>`` tags: the tuned values a trial used (active parameters only)
EPOCHS_TAG = "ltstudy.epochs"  # epochs a trial ran
WALL_TAG = "ltstudy.wall_s"  # a trial's wall time as the Tune driver saw it
NUMBER_TAG = "optuna_trial_number"
OPTUNA_STORAGE_TAG = "ltstudy.optuna_storage"  # the journal file / RDB URL holding the Optuna study
#: MLflow 3 opens an experiment on its GenAI "Traces" view unless it is marked as model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CONFIG_ARTIFACT = "config.yaml"
PER_CLASS_PLOT = "per_class_accuracy.png"
_METRIC_PREFIXES = ("train_", "val_", "test_", "startup_")
_METRIC_EXTRA = ("lr", "epoch_seconds", "epoch_wall_s", "time_in_run_trial_s", "reused_process")


class TrackingError(LtstudyError):
    """The tracking store cannot be reached or does not hold what was asked for."""


# ---------------------------------------------------------------------------------------------- URIs
def resolve_tracking_uri(uri: str | None) -> str:
    """Flag, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///<cwd>/mlflow.db`` (always absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {uri!r}: use sqlite:///path/mlflow.db or http(s)://host:port "
                            "(MLflow 3.13+ no longer accepts the file store)")
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail with one line before anything is written when the tracking store is out of reach."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"tracking server {uri} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"tracking server {uri} is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist")


def client(uri: str):
    import logging

    # MLflow draws a tqdm bar on stderr for every artifact download, terminal or not, and logs its
    # database set-up at INFO: neither is news to a person reading a command's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


def git_commit() -> str:
    """The commit of the ltstudy checkout (``unknown`` outside git), for provenance tags."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------- helpers
def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's scalar metrics from a Tune result (no Tune bookkeeping, no lists, finite only)."""
    out = {}
    for key, value in result.items():
        if not (key.startswith(_METRIC_PREFIXES) or key in _METRIC_EXTRA):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        out[key] = float(value)
    return out


def params_as_strings(flat: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in flat.items()}


def log_batch(mlc, run_id: str, metrics=(), params=None, tags=None) -> int:
    """Metrics, params and tags in as few ``log_batch`` calls as MLflow allows (100 params, 100 tags and
    1000 metrics a call, 1000 entities in all); returns the number of calls."""
    from mlflow.entities import Param, RunTag

    params = [Param(k, v) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metrics = list(metrics)
    calls = 0
    while params or tags or metrics:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        room = 1000 - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        mlc.log_batch(run_id, metrics=m, params=p, tags=t)
        calls += 1
    return calls


def trial_outcome(result: dict[str, Any] | None, errored: bool,
                  objectives: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(completed | pruned | failed, why it failed): a trial that stopped before its last epoch was pruned
    (early stopping); one that ended with a NaN objective failed."""
    if errored or not result:
        return "failed", None
    if result.get("failure"):
        return "failed", str(result["failure"])
    if int(result.get("epoch", 0)) < int(result.get("epochs_total", 0)):
        return "pruned", None
    bad = [m for m in objectives if not _finite(result.get(m))]
    if bad:
        return "failed", f"objective {bad[0]} is {result.get(bad[0])} at the last epoch"
    return "completed", None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------- the study
class StudyTracker:
    """The experiment (one per study) and its parent run; created only after all input is valid."""

    def __init__(self, uri: str, study: str) -> None:
        self.uri, self.study = uri, study
        self.mlc = client(uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def open(self, tags: dict[str, Any], resume: bool) -> str:
        """Get or create the experiment and the study run; on resume reuse both.

        A fresh start finds no study run unless an earlier start failed before its first trial (Ray never
        started, e.g. a cluster that went away): that run is deleted and the study starts again.
        """
        exp = self.mlc.get_experiment_by_name(self.study)
        if exp is None:
            self.experiment_id = self.mlc.create_experiment(self.study, tags={STUDY_TAG: self.study,
                                                                             **EXPERIMENT_KIND})
        elif exp.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {self.study!r} is deleted in {self.uri}; restore it or pick "
                                "another --study-name")
        else:
            self.experiment_id = exp.experiment_id
        parent = self._find_parent()
        if parent is not None and not resume:
            if self.mlc.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'", max_results=1):
                raise TrackingError(f"study {self.study!r} already has trial runs in {self.uri}; pass --resume "
                                    "or pick another --study-name")
            self.mlc.delete_run(parent)  # a start that failed before any trial: start again
            parent = None
        if parent is None:
            run = self.mlc.create_run(self.experiment_id, run_name=self.study,
                                      tags={ROLE_TAG: "study", STUDY_TAG: self.study})
            self.parent_run_id = run.info.run_id
            log_batch(self.mlc, self.parent_run_id, tags=tags)
        else:
            self.parent_run_id = parent
            self.mlc.update_run(parent, status="RUNNING")
            log_batch(self.mlc, parent, tags={"ltstudy.interrupted": "false"})
        return self.parent_run_id

    def _find_parent(self) -> str | None:
        runs = self.mlc.search_runs([self.experiment_id], f"tags.`{ROLE_TAG}` = 'study'",
                                    max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.mlc.log_artifact(self.parent_run_id, str(path), artifact_path)

    def finish(self, space_text: str, obj: Objectives, optuna_study: Any = None,
               status: str = "FINISHED") -> dict[str, Any]:
        """Put the best trial (or the Pareto front), its gain over the published trial, the space and
        the plots on the study run; returns ``{"best", "front", "gain", "trials"}``."""
        trials = study_trials(self.mlc, self.experiment_id, self.parent_run_id)
        best = pick_best(trials, obj)
        front = pareto_front(trials, obj) if obj.multi else []
        gain = gain_over_published(trials, best, obj)
        self.mlc.log_text(self.parent_run_id, space_text, "search_space.yaml")
        if best is not None:
            _log_best(self.mlc, self.parent_run_id, best)
        if front:
            log_batch(self.mlc, self.parent_run_id, tags={"ltstudy.pareto_trials": ",".join(
                t["trial_id"] for t in front)})
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if gain:
            log_batch(self.mlc, self.parent_run_id,
                      metrics=[Metric(f"gain_over_published.{k}", v, now, 0) for k, v in gain.items()])
        parent = self.mlc.get_run(self.parent_run_id)
        pngs, imp = study_pngs(self.mlc, parent, trials, obj.metric, optuna_study, best)
        _log_pngs(self.mlc, self.parent_run_id, pngs)
        if imp:
            log_batch(self.mlc, self.parent_run_id,
                      metrics=[Metric(f"importance.{k}", float(v), now, 0) for k, v in imp.items()])
        log_batch(self.mlc, self.parent_run_id,
                  tags={f"ltstudy.trials_{k}": v for k, v in status_counts(trials).items()})
        self.mlc.set_terminated(self.parent_run_id, status)
        return {"best": best, "front": front, "gain": gain, "trials": trials}

    def interrupted(self, how: str) -> int:
        """Mark the study run and every trial run still RUNNING as KILLED (tagged interrupted)."""
        killed = 0
        for run in self.mlc.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                        max_results=5000):
            if run.info.status == "RUNNING":
                log_batch(self.mlc, run.info.run_id, tags={STATUS_TAG: "interrupted"})
                self.mlc.set_terminated(run.info.run_id, "KILLED")
                killed += 1
        log_batch(self.mlc, self.parent_run_id, tags={"ltstudy.interrupted": how})
        self.mlc.set_terminated(self.parent_run_id, "KILLED")
        return killed


def _log_best(mlc, run_id: str, best: dict[str, Any]) -> None:
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in best["metrics"].items()]
    tags = {"ltstudy.best_trial_id": best["trial_id"], "ltstudy.best_run_id": best["run_id"]}
    log_batch(mlc, run_id, metrics=metrics, tags=tags)
    try:
        log_batch(mlc, run_id, params=best["params"])
    except MlflowException:  # a resumed study whose best changed: params are immutable, keep tags
        log_batch(mlc, run_id, tags={f"best.{k}": v for k, v in best["params"].items()})


# --------------------------------------------------------------------------- reading a study back
def study_trials(mlc, experiment_id: str, parent_run_id: str, role: str = "trial") -> list[dict[str, Any]]:
    """Every trial run (``role="confirmation"``: every confirmation run) of a study, oldest first."""
    runs = mlc.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                            f"tags.`{ROLE_TAG}` = '{role}'",
                           max_results=5000, order_by=["attributes.start_time ASC"])
    return [{"run_id": r.info.run_id, "trial_id": r.data.tags.get(TRIAL_TAG, ""),
             "status": r.data.tags.get(STATUS_TAG, "running"), "metrics": dict(r.data.metrics),
             "params": dict(r.data.params), "mlflow_status": r.info.status,
             "published": r.data.tags.get(PUBLISHED_TAG) == "true", "confirms": r.data.tags.get(CONFIRMS_TAG),
             "seed": r.data.tags.get("seed"), "error": r.data.tags.get("error"),
             "node_id": r.data.tags.get("node_id"),
             "number": int(r.data.tags[NUMBER_TAG]) if r.data.tags.get(NUMBER_TAG, "").isdigit() else None,
             "tuned": {k[len(TUNED_PREFIX):]: v for k, v in r.data.tags.items() if k.startswith(TUNED_PREFIX)},
             "tags": dict(r.data.tags), "start_time": r.info.start_time, "end_time": r.info.end_time}
            for r in runs]


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


def export_best(uri: str, study: str, pick: str | None = None) -> dict[str, Any]:
    """The recommended trial's resolved config plus a ``provenance`` block, read from the tracking store.

    The recommendation is, in this order: the confirmed winner (best mean validation objective over the
    confirmation seeds) when the study was confirmed; for a multi-objective study the Pareto point that
    ``pick`` names; else the best trial.
    """
    mlc, exp, parent = find_study(uri, study)
    obj = Objectives.from_tags(parent.data.tags)
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    ranking = confirmed_ranking(study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation"), obj)
    by_id = {t["trial_id"]: t for t in trials}
    confirmed = None
    if ranking and ranking[0]["trial_id"] in by_id and not obj.multi:
        chosen, confirmed = by_id[ranking[0]["trial_id"]], ranking
    elif obj.multi:
        chosen = pick_point(trials, obj, pick)
    else:
        chosen = pick_best(trials, obj)
        if chosen is None:
            raise TrackingError(f"study {study!r} has no finished trial with {obj.metric!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = mlc.download_artifacts(chosen["run_id"], CONFIG_ARTIFACT, tmp)
        config = yaml.safe_load(Path(path).read_text())
    config["provenance"] = {
        "study": study, "trial_id": chosen["trial_id"], "run_id": chosen["run_id"],
        "tracking_uri": uri, "objective": {"metric": ",".join(obj.metrics), "mode": ",".join(obj.modes)},
        "status": chosen["status"], "published": chosen["published"],
        "metrics": {k: chosen["metrics"][k] for k in sorted(chosen["metrics"]) if k.startswith(("val_", "test_"))},
        "selected_by": "confirmation" if confirmed else ("pick " + str(pick) if obj.multi else "best trial"),
    }
    if confirmed:
        config["provenance"]["confirmation"] = {
            "metric": obj.metric, "ranking": [{k: row[k] for k in ("trial_id", "mean", "std", "seeds")}
                                              for row in confirmed]}
    return config


# ------------------------------------------------------------------------------------------- plots
def published_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The published configuration: always Optuna trial 0 (enqueued first, see ``make_searcher``)."""
    return next((t for t in trials if t.get("number") == 0), None)


def per_class_of(mlc, run_id: str) -> dict[str, list[float]] | None:
    """A finished trial's ``per_class_accuracy.json`` (val and, after the last epoch, test)."""
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(mlc.download_artifacts(run_id, "per_class_accuracy.json", tmp)).read_text())
    except (MlflowException, OSError, ValueError):
        return None


def study_pngs(mlc, parent: Any, trials: list[dict[str, Any]], metric: str, optuna_study: Any,
               best: dict[str, Any] | None) -> tuple[dict[str, bytes], dict[str, float]]:
    """Every figure of a study (the Optuna plots and the best-vs-published per-class plot) and the
    parameter importances, from its records."""
    from ltstudy.study.dataset import record_from_run
    from ltstudy.study.plots import OPTUNA_PLOTS, importances, message_png, optuna_pngs, per_class_png

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
    return pngs, imp


def _log_pngs(mlc, run_id: str, pngs: dict[str, bytes], folder: str = "plots") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, png in pngs.items():
            path = Path(tmp) / f"{name}.png"
            path.write_bytes(png)
        mlc.log_artifacts(run_id, tmp, folder)


def checkpoint_of_run(tracking_uri: str | None, run_id: str) -> str:
    """The checkpoint folder of a finished trial's MLflow run (tagged when the trial ended)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no MLflow run {run_id!r} in {uri}") from None
    path = run.data.tags.get(CHECKPOINT_TAG)
    if not path:
        raise ConfigError(f"MLflow run {run_id} has no checkpoint (tag {CHECKPOINT_TAG}); "
                          "pass the checkpoint file instead")
    return path


def resolve_backbone(value: str, tracking_uri: str | None = None) -> str:
    """A checkpoint file or folder as given, or the checkpoint of the MLflow run with that id."""
    if Path(value).expanduser().exists() or "/" in value or value.endswith(".pt"):
        return str(Path(value).expanduser().resolve())
    return checkpoint_of_run(tracking_uri, value)
