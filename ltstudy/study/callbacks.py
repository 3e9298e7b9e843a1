"""The Ray Tune callbacks of a study: one MLflow child run per trial, and freeing Train placement groups.

Why not Ray's ``MLflowLoggerCallback``: it has no parent/child nesting, sends one request per metric, and
opens a second run for a trial that is restored after a crash (ray#48664). :class:`MLflowTrialCallback`
uses ``log_batch``, nests each trial under the study run with ``mlflow.parentRunId``, and finds an existing
run by the ``ltstudy.trial_id`` tag before creating one, so every trial has exactly one run even across
``ltstudy tune --resume``.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import ray.tune
import yaml

from ltstudy.config import CONFIRMS_KEY, PUBLISHED_KEY, resolve_config
from ltstudy.study.runner import PLACEMENT_GROUP_KEY
from ltstudy.study.tracking import (
    CHECKPOINT_TAG,
    CONFIG_ARTIFACT,
    CONFIRMS_TAG,
    ENDED,
    PARENT_TAG,
    PUBLISHED_TAG,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    client,
    log_batch,
    params_as_strings,
    trial_metrics,
    trial_outcome,
)


class MLflowTrialCallback(ray.tune.Callback):
    """One child run per Tune trial, found again by tag on restore; ``log_batch`` once per epoch."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str,
                 commit: str = "unknown", echo: Any = None, objectives: tuple[str, ...] = (),
                 role: str = "trial") -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.study, self.commit, self.echo = study, commit, echo
        self.objectives, self.role = tuple(objectives), role
        self._mlc = None
        self._runs: dict[str, str] = {}
        self._ended: set[str] = set()  # trials whose run ended before a restore: never touched again
        self._logged: dict[str, int] = {}  # a restored trial's last logged epoch: not logged twice
        self._start: dict[str, float] = {}
        self.wall: dict[str, float] = {}  # trial id -> driver-side wall time, for ``bench study``

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; clients and run caches are rebuilt on restore.
        state = dict(self.__dict__)
        state.update(_mlc=None, _runs={}, _ended=set(), _logged={}, _start={}, echo=None)
        return state

    @property
    def mlc(self):
        if self._mlc is None:
            self._mlc = client(self.uri)
        return self._mlc

    def run_id(self, trial: Any) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = self.mlc.search_runs([self.experiment_id], f"tags.`{TRIAL_TAG}` = '{tid}'", max_results=5)
        if found and found[0].data.tags.get(STATUS_TAG) in ENDED:
            # the trial ended before the driver died, but Tune's state had not caught up: it replays
            # the trial from its final checkpoint; its record is complete and stays as it is
            run_id = found[0].info.run_id
            self._ended.add(tid)
        elif found:
            # a trial restored from its last Tune checkpoint re-runs the epochs after it; the epochs it
            # logged before the driver stopped are reproduced exactly, so they are not logged again
            run_id = found[0].info.run_id
            history = self.mlc.get_metric_history(run_id, "train_loss")
            self._logged[tid] = max((m.step for m in history), default=0)
            self.mlc.update_run(run_id, status="RUNNING")
            log_batch(self.mlc, run_id, tags={STATUS_TAG: "running"})
        else:
            run_id = self._create(trial)
        self._runs[tid] = run_id
        return run_id

    def _create(self, trial: Any) -> str:
        flat = resolve_config(dict(trial.config)).to_dict()
        prefix = "confirm" if self.role == "confirmation" else "trial"
        run = self.mlc.create_run(self.experiment_id, run_name=f"{prefix}-{trial.trial_id}", tags={
            PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study,
            ROLE_TAG: self.role})
        tags = {"method": flat["method"], "dataset": flat["dataset"], "imbalance": flat["imbalance"],
                "seed": flat["seed"], "trial_id": trial.trial_id, "git_commit": self.commit,
                STATUS_TAG: "running"}
        if trial.config.get(PUBLISHED_KEY):
            tags[PUBLISHED_TAG] = "true"
        if trial.config.get(CONFIRMS_KEY):
            tags[CONFIRMS_TAG] = trial.config[CONFIRMS_KEY]
        if flat.get("feature_key"):
            tags["feature_key"] = flat["feature_key"]
        log_batch(self.mlc, run.info.run_id, params=params_as_strings(flat), tags=tags)
        self.mlc.log_text(run.info.run_id, yaml.safe_dump(flat, sort_keys=False), CONFIG_ARTIFACT)
        return run.info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start[trial.trial_id] = time.time()
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        if "epoch" not in result:
            return
        run_id = self.run_id(trial)
        step = int(result["epoch"])
        if trial.trial_id in self._ended or step <= self._logged.get(trial.trial_id, 0):
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in trial_metrics(result).items()]
        tags = {"node_id": result["node_id"]} if result.get("node_id") else None
        log_batch(self.mlc, run_id, metrics=metrics, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def _end(self, trial: Any, errored: bool) -> None:
        run_id = self.run_id(trial)
        if trial.trial_id in self._ended:
            return
        last = trial.last_result or {}
        outcome, why = trial_outcome(last, errored, self.objectives)
        tags = {STATUS_TAG: outcome, "early_stopped": str(outcome == "pruned").lower()}
        if outcome == "failed":
            trace = _error_trace(trial) if errored else None
            tags["error"] = (why or _last_line(trace) or "trial raised an error")[:4000]
            if trace:
                self.mlc.log_text(run_id, trace, "error.txt")
        if trial.trial_id in self._start:
            self.wall[trial.trial_id] = time.time() - self._start[trial.trial_id]
        checkpoint = last.get("checkpoint_path") or getattr(trial.checkpoint, "path", None)
        if checkpoint:  # lets `--backbone RUN_ID` find the trained weights later
            tags[CHECKPOINT_TAG] = checkpoint
        log_batch(self.mlc, run_id, tags=tags)
        per_class = {k: last[k] for k in ("val_per_class", "test_per_class") if k in last}
        if per_class:
            self.mlc.log_dict(run_id, per_class, "per_class_accuracy.json")
        status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[outcome]
        self.mlc.set_terminated(run_id, status)
        if self.echo is not None:
            self.echo(trial.trial_id, outcome, {**last, **({"failure": tags["error"]} if why or errored else {})})


def _error_trace(trial: Any) -> str | None:
    """The full text of the error a trial raised (Ray keeps it in the trial's folder)."""
    try:
        text = trial.get_error()
    except Exception:  # noqa: BLE001 - the trace is a courtesy; the tag says failed either way
        return None
    text = str(text or "").strip()
    return text or None


def _last_line(text: str | None) -> str | None:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else None



class PlacementGroupReaper(ray.tune.Callback):
    """Removes a multi-worker trial's Train placement group when the trial ends.

    Tune ends a trial by killing its actor (ASHA stops, ``max_t``); Ray Train V2's own
    ``PlacementGroupCleaner`` then misses the orphaned workers' group often enough (seen here with
    Ray 2.60: a 2-worker study on a 2-CPU box deadlocked with the group still CREATED), so the study
    frees it itself. Rank 0 reports the group's id with every result.
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remove(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remove(trial)

    @staticmethod
    def _remove(trial: Any) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        group = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if not group:
            return
        try:
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))
        except Exception:  # noqa: BLE001 - already removed by Ray's cleaner: nothing to do
            pass
