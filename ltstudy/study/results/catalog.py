"""The studies in a tracking store, read back for people: one study's trials as a pandas frame with its
header (counts by status, dataset, sampler, scheduler, start, duration, whether it can be resumed), and
deleting a study everywhere it left something (MLflow experiment, Optuna study, storage folder).

Reads MLflow (and, for resumability and deletion, the storage folder and the Optuna storage); never Ray.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs as pafs

from ltstudy.errors import ConfigError
from ltstudy.study.results.selection import Objectives, recommended
from ltstudy.study.search.optuna_storage import open_optuna_storage
from ltstudy.study.storage import STUDY_MARKER, has_marker
from ltstudy.study.tracking.records import find_study, status_counts, study_trials
from ltstudy.study.tracking.store import OPTUNA_STORAGE_TAG, STUDY_TAG, TrackingError, client

#: the frame's fixed columns; the tuned parameters follow ``objective``
FIXED_COLUMNS = ("number", "trial_id", "status", "objective", "epochs")
TAIL_COLUMNS = ("node", "wall_s", "start", "run_id")


@dataclass(kw_only=True)
class StudyInfo:
    """One study as ``studies show`` prints it."""

    study: str
    experiment_id: str
    parent_run_id: str
    method: str
    metric: str
    mode: str
    dataset: str
    sampler: str
    scheduler: str
    num_trials: int
    counts: dict[str, int]
    start: str
    duration_s: float
    status: str
    resumable: bool
    resume_note: str
    storage: str
    optuna_storage: str
    best: dict[str, Any] | None
    trials: list[dict[str, Any]] = field(repr=False)

    def header(self) -> dict[str, Any]:
        """The study-level facts (JSON-ready)."""
        return {"study": self.study, "method": self.method, "objective": f"{self.mode} {self.metric}",
                "dataset": self.dataset, "sampler": self.sampler, "scheduler": self.scheduler,
                "trials": self.num_trials, "counts": self.counts, "start": self.start,
                "duration_s": round(self.duration_s, 1), "status": self.status, "resumable": self.resumable,
                "resume_note": self.resume_note, "storage": self.storage, "optuna_storage": self.optuna_storage,
                "best_trial": (self.best or {}).get("number"), "best_trial_id": (self.best or {}).get("trial_id"),
                "best": (self.best or {}).get("metrics", {}).get(self.metric),
                "selected_by": "confirmation" if (self.best or {}).get("confirmed") else "best trial",
                "confirmed": (self.best or {}).get("confirmed"),
                "mlflow_experiment_id": self.experiment_id, "mlflow_study_run_id": self.parent_run_id}


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number_or_text(values: list[Any]) -> list[Any]:
    """A tuned column as floats when every value is numeric (CSV and Parquet then agree), else text."""
    present = [v for v in values if v is not None]
    try:
        [float(v) for v in present]
    except (TypeError, ValueError):
        return values
    if any(str(v) in ("True", "False") for v in present):
        return values
    return [float(v) if v is not None else math.nan for v in values]


def trials_frame(trials: list[dict[str, Any]], metric: str):
    """One row per trial: Optuna number, Tune id, status, objective, epochs, the tuned values it used,
    node, wall time, start, MLflow run id."""
    tuned: list[str] = []
    for t in trials:
        tuned += [k for k in t["tuned"] if k not in tuned]
    rows = []
    for t in trials:
        tags = t["tags"]
        wall = tags.get("ltstudy.wall_s")
        epochs = tags.get("ltstudy.epochs")
        rows.append({"number": t["number"], "trial_id": t["trial_id"], "status": t["status"],
                     "objective": t["metrics"].get(metric, math.nan),
                     "epochs": int(epochs) if epochs and epochs.isdigit() else None,
                     **{k: t["tuned"].get(k) for k in tuned},
                     "node": tags.get("node_id", "")[:8], "wall_s": float(wall) if wall else math.nan,
                     "start": _iso(t["start_time"]), "run_id": t["run_id"]})
    columns = [*FIXED_COLUMNS, *tuned, *TAIL_COLUMNS]
    frame = pd.DataFrame(rows, columns=columns)
    for k in tuned:
        frame[k] = _number_or_text(frame[k].tolist())
    frame["number"] = frame["number"].astype("Int64")
    frame["epochs"] = frame["epochs"].astype("Int64")
    frame["objective"] = frame["objective"].astype(float)
    frame["wall_s"] = frame["wall_s"].astype(float)
    return frame.sort_values("number", na_position="last", kind="stable").reset_index(drop=True)


def _path_exists(uri: str) -> bool:
    if "://" not in uri:
        return Path(uri).exists()
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def resumability(storage: str, status: str, ended: int, num_trials: int) -> tuple[bool, str]:
    """Whether ``ltstudy tune ... --resume`` has something to continue, and why (not)."""
    if not storage:
        return False, "no storage recorded"
    try:
        has_state = _path_exists(f"{storage.rstrip('/')}/tuner.pkl")
    except OSError as exc:
        return False, f"storage unreadable: {exc}"
    if not has_state:
        return False, "no Tune state in the storage folder"
    if status == "FINISHED" and ended >= num_trials:
        return False, "finished (every trial ended)"
    return True, f"{max(num_trials - ended, 0)} of {num_trials} trials left" if ended < num_trials else \
        "interrupted before its summary"


def study_info(uri: str, study: str) -> StudyInfo:
    """Everything ``studies show`` needs, from the tracking store (and the storage folder)."""
    mlc, exp, parent = find_study(uri, study)
    tags = parent.data.tags
    metric, mode = tags.get("ltstudy.metric", "val_top1"), tags.get("ltstudy.mode", "max")
    trials = study_trials(mlc, exp.experiment_id, parent.info.run_id)
    counts = status_counts(trials)
    num_trials = int(tags.get("ltstudy.num_trials", len(trials)))
    ended = sum(v for k, v in counts.items() if k != "running")
    start, end = parent.info.start_time, parent.info.end_time
    duration = ((end or time.time() * 1000) - start) / 1000 if start else math.nan
    storage = tags.get("ltstudy.storage", "")
    ok, note = resumability(storage, parent.info.status, ended, num_trials)
    inputs = getattr(parent, "inputs", None)
    datasets = [f"{d.dataset.name} ({d.dataset.digest})" for d in getattr(inputs, "dataset_inputs", None) or []]
    return StudyInfo(
        study=study, experiment_id=exp.experiment_id, parent_run_id=parent.info.run_id,
        method=tags.get("ltstudy.method", "?"), metric=metric, mode=mode,
        dataset=", ".join(datasets) or tags.get("dataset", "?"), sampler=tags.get("ltstudy.sampler", "?"),
        scheduler=tags.get("ltstudy.scheduler", "?"), num_trials=num_trials, counts=counts, start=_iso(start),
        duration_s=duration, status=parent.info.status, resumable=ok, resume_note=note, storage=storage,
        optuna_storage=tags.get(OPTUNA_STORAGE_TAG, ""), best=recommended(
            trials, study_trials(mlc, exp.experiment_id, parent.info.run_id, "confirmation"),
            Objectives.from_tags(tags)),
        trials=trials)


def list_infos(uri: str) -> list[StudyInfo]:
    """Every ltstudy study in the store, oldest first."""
    out = []
    for exp in client(uri).search_experiments(max_results=1000, order_by=["creation_time ASC"]):
        name = exp.tags.get(STUDY_TAG)
        if not name:
            continue
        try:
            out.append(study_info(uri, name))
        except TrackingError:
            continue
    return out


def frame_json(info: StudyInfo, frame) -> str:
    """``{"study": header, "trials": [rows]}``; NaN becomes null."""
    rows = json.loads(frame.to_json(orient="records"))
    return json.dumps({"study": info.header(), "trials": rows}, indent=2)


# --------------------------------------------------------------------------------------- deleting
def deletion_plan(info: StudyInfo) -> list[str]:
    """What ``studies delete`` removes, one line each (shown before the confirmation)."""
    lines = [f"MLflow experiment {info.study!r} (id {info.experiment_id}, {len(info.trials) + 1} runs)"]
    if info.optuna_storage:
        lines.append(f"Optuna study {info.study!r} in {info.optuna_storage}")
    for path in _storage_paths(info):
        lines.append(f"folder {path}")
    return lines


def _storage_paths(info: StudyInfo) -> list[str]:
    """The study's Tune folder and the Train run folders of its multi-worker trials (siblings of it).

    Only a folder holding the marker that names this study is the study's: a ``ltstudy.storage`` tag that
    points anywhere else (planted, or a folder moved by hand) is refused in one line, nothing deleted.
    """
    if not info.storage or not _path_exists(info.storage):
        return []
    if not has_marker(info.storage, info.study):
        raise ConfigError(f"{info.storage} holds no {STUDY_MARKER} naming study {info.study!r}: it is not "
                          "provably this study's folder, so nothing is deleted (remove it by hand if it is)")
    root = info.storage.rstrip("/").rsplit("/", 1)[0]
    paths = [info.storage] + [f"{root}/train-{t['trial_id']}" for t in info.trials if t["trial_id"]]
    return [p for p in paths if _path_exists(p)]


def delete_study(uri: str, info: StudyInfo) -> list[str]:
    """Remove the study everywhere; returns what was removed.

    The MLflow experiment is renamed (so the study name can be used again) and moved to MLflow's trash,
    from which ``mlflow gc`` deletes it for good; the Optuna study and the folders are deleted.
    """
    done = []
    paths = _storage_paths(info)
    if info.optuna_storage:
        try:
            optuna.delete_study(study_name=info.study, storage=open_optuna_storage(info.optuna_storage))
            done.append(f"Optuna study {info.study!r}")
        except KeyError:
            done.append(f"Optuna study {info.study!r}: already gone")
    for path in paths:
        if "://" in path:
            filesystem, inner = pafs.FileSystem.from_uri(path)
            filesystem.delete_dir(inner)
        else:
            shutil.rmtree(path)
        done.append(f"folder {path}")
    mlc = client(uri)
    trashed = f"{info.study}.deleted-{datetime.now():%Y%m%d-%H%M%S}"
    mlc.rename_experiment(info.experiment_id, trashed)
    mlc.delete_experiment(info.experiment_id)
    done.append(f"MLflow experiment {info.study!r} (in MLflow's trash as {trashed!r}; `mlflow gc` removes it)")
    return done
