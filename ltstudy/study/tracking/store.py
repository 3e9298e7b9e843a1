"""The MLflow store of a study: where it is, one client, the tags every record uses, batched writes.

MLflow only, no Ray. The study run is :mod:`.study_run`, reading trials back :mod:`.records`, the Tune
callback that writes one child run per trial :mod:`.callback` (through the background :mod:`.writer`).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from ltstudy.errors import LtstudyError

STUDY_TAG = "ltstudy.study"
ROLE_TAG = "ltstudy.role"
TRIAL_TAG = "ltstudy.trial_id"
STATUS_TAG = "ltstudy.status"  # completed | pruned | budget | failed | running | interrupted
PUBLISHED_TAG = "ltstudy.published"  # "true" on the published configuration's trial run
BUDGET_TAG = "ltstudy.budget"  # on a successive-halving run: "epochs/full epochs" it ran
CONFIRMS_TAG = "ltstudy.confirms"  # on a confirmation run: the trial id it re-runs with another seed
ENDED = ("completed", "pruned", "budget", "failed")  # statuses of a trial run that must never be touched again
CHECKPOINT_TAG = "ltstudy.checkpoint"  # where the trial's last checkpoint lives (storage URI)
PARENT_TAG = "mlflow.parentRunId"
TUNED_PREFIX = "tuned."  # ``tuned.<name>`` tags: the tuned values a trial used (active parameters only)
EPOCHS_TAG = "ltstudy.epochs"  # epochs a trial ran
WALL_TAG = "ltstudy.wall_s"  # a trial's wall time as the Tune driver saw it
NUMBER_TAG = "optuna_trial_number"
OPTUNA_STORAGE_TAG = "ltstudy.optuna_storage"  # the journal file / RDB URL holding the Optuna study
#: the MLflow run status of each outcome of a trial
RUN_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "budget": "KILLED", "failed": "FAILED"}
#: MLflow 3 opens an experiment on its GenAI "Traces" view unless it is marked as model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
CONFIG_ARTIFACT = "config.yaml"
RELIABILITY_JSON = "reliability.json"  # a finished trial's calibration bins
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


def sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: a folder of ``mlruns/`` beside the file,
    so that a store named by its path is one folder wherever the command ran (MLflow's own default is
    ``./mlruns`` of the current folder); None for a server, which has its own artifact root. The folder's
    name is the experiment's, made path-safe, and a random tail (a study deleted to MLflow's trash keeps its
    folder until ``mlflow gc``; a new study of the same name gets another)."""
    db = sqlite_file(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", experiment).lstrip(".") or "experiment"
    return str(db.parent / "mlruns" / f"{safe}-{uuid.uuid4().hex[:8]}")


def check_reachable(uri: str, timeout: float = 5.0, existing: bool = False) -> None:
    """Fail with one line before anything is written when the tracking store is out of reach (``existing``:
    for commands that only read, a SQLite file that is not there, which opening it would create)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"tracking server {uri} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"tracking server {uri} is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        path = sqlite_file(uri)
        if not path.parent.is_dir():
            raise TrackingError(f"tracking store {uri}: folder {path.parent} does not exist")
        if existing and not path.is_file():
            raise TrackingError(f"tracking store {uri}: {path} does not exist (no study has recorded there)")


#: new SQLite stores whose schema is ready in a temporary folder (:func:`make_schema`): file -> template
_SCHEMAS: dict[Path, Path] = {}


def make_schema(uri: str) -> None:
    """For a SQLite store that does not exist yet: an empty store with MLflow's schema (its migrations take
    1.7 s on a 2-core machine), made in a temporary folder, so that a study can build it while Ray starts and
    still write nothing at ``uri`` before its nodes are checked. :func:`client` copies it into place, if the
    file is still missing then."""
    db = sqlite_file(uri)
    if db is None or db.exists() or db in _SCHEMAS:
        return
    folder = tempfile.mkdtemp(prefix="ltstudy-schema-")
    atexit.register(shutil.rmtree, folder, True)
    template = Path(folder) / "mlflow.db"
    client(f"sqlite:///{template}").search_experiments(max_results=1)  # creates and migrates it
    _SCHEMAS[db] = template


def client(uri: str) -> MlflowClient:
    # MLflow draws a tqdm bar on stderr for every artifact download, terminal or not, and logs its
    # database set-up at INFO: neither is news to a person reading a command's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    db = sqlite_file(uri)
    if db is not None and (template := _SCHEMAS.pop(db, None)) is not None:
        if db.parent.is_dir() and not db.exists():
            shutil.copyfile(template, db)  # MLflow's own schema check then finds it current
        shutil.rmtree(template.parent, ignore_errors=True)
    return MlflowClient(tracking_uri=uri)


def download_artifact(mlc: MlflowClient, run_id: str, path: str, dst: str) -> str:
    """``mlc.download_artifacts``, also from a store pulled home (``ltstudy cluster pull``): its runs'
    ``mlflow-artifacts:/…`` URIs name the server's artifact folder, here ``mlartifacts/`` beside the SQLite
    file, which MLflow resolves through a server only."""
    db = sqlite_file(mlc.tracking_uri)
    if db is not None:
        artifact_uri = mlc.get_run(run_id).info.artifact_uri or ""
        if artifact_uri.startswith("mlflow-artifacts:"):
            served = db.parent / "mlartifacts" / urlsplit(artifact_uri).path.lstrip("/")
            src = served / path
            if not src.is_file():
                raise TrackingError(f"run {run_id}: {path} is not in {served} (pull the artifacts with the store)")
            return shutil.copy(src, Path(dst) / Path(path).name)
    return mlc.download_artifacts(run_id, path, dst)


def git_commit() -> str:
    """The commit of the ltstudy checkout (``unknown`` outside git), for provenance tags."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------- helpers
def is_metric(key: str) -> bool:
    """Whether a result key is one of the trainer's metrics (not Tune's bookkeeping)."""
    return key.startswith(_METRIC_PREFIXES) or key in _METRIC_EXTRA


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's scalar metrics from a Tune result (no Tune bookkeeping, no lists, finite only)."""
    out = {}
    for key, value in result.items():
        if not is_metric(key):
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
    """(completed | pruned | budget | failed, why it failed): a trial that stopped before its last epoch was
    pruned (early stopping) or cut by the time budget (``stopped_by: budget``, see ``study.search.budget``); one that
    ended with a NaN objective failed."""
    if errored or not result:
        return "failed", None
    if result.get("failure"):
        return "failed", str(result["failure"])
    if result.get("stopped_by") == "budget":
        return "budget", None
    if int(result.get("epoch", 0)) < int(result.get("epochs_total", 0)):
        return "pruned", None
    bad = [m for m in objectives if not _finite(result.get(m))]
    if bad:
        return "failed", f"objective {bad[0]} is {result.get(bad[0])} at the last epoch"
    return "completed", None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


LOCAL_UI = "http://127.0.0.1:5000"  # where ``mlflow ui`` listens by default


def run_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where a person opens the experiment (or run): the server's page, or for a local store the page
    that ``mlflow ui --backend-store-uri URI`` serves on its default address."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"{LOCAL_UI}/{page}"
