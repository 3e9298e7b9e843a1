"""The Ray Tune callbacks of a study: one MLflow child run per trial, the progress lines, and freeing Train
placement groups.

Why not Ray's ``MLflowLoggerCallback``: it has no parent/child nesting, sends one request per metric, and
opens a second run for a trial that is restored after a crash (ray#48664). :class:`MLflowTrialCallback`
uses ``log_batch``, nests each trial under the study run with ``mlflow.parentRunId``, and finds an existing
run by the ``ltstudy.trial_id`` tag before creating one, so every trial has exactly one run even across
``ltstudy tune --resume``.

Each trial run also says what a person looks for first: the tuned values it used (``tuned.<name>`` tags,
only the parameters that were active), its Optuna trial number (and the run id on the Optuna trial, see
:mod:`ltstudy.study.links`), the dataset as an MLflow dataset input, and, once finished, its per-class
accuracy plotted head to tail.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.tune
import yaml

from ltstudy.config import CONFIRMS_KEY, PUBLISHED_KEY, resolve_config
from ltstudy.study.dataset import DatasetRecord, data_key, dataset_record
from ltstudy.study.links import run_url
from ltstudy.study.runner import PLACEMENT_GROUP_KEY
from ltstudy.study.space import Param, active_values
from ltstudy.study.tracking import (
    CHECKPOINT_TAG,
    CONFIG_ARTIFACT,
    CONFIRMS_TAG,
    ENDED,
    EPOCHS_TAG,
    NUMBER_TAG,
    PARENT_TAG,
    PER_CLASS_PLOT,
    PUBLISHED_TAG,
    ROLE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TUNED_PREFIX,
    WALL_TAG,
    client,
    log_batch,
    params_as_strings,
    trial_metrics,
    trial_outcome,
)


class MLflowTrialCallback(ray.tune.Callback):
    """One child run per Tune trial, found again by tag on restore; ``log_batch`` once per epoch."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str,
                 commit: str = "unknown", echo: Any = None, params: tuple[Param, ...] = (),
                 links: Any = None, objectives: tuple[str, ...] = (), role: str = "trial") -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.study, self.commit, self.echo = study, commit, echo
        self.params, self.links = params, links  # the tuned parameters; study.links.OptunaLinks
        self.objectives, self.role = tuple(objectives), role
        self._mlc = None
        self._runs: dict[str, str] = {}
        self._ended: set[str] = set()  # trials whose run ended before a restore: never touched again
        self._logged: dict[str, int] = {}  # a restored trial's last logged epoch: not logged twice
        self._start: dict[str, float] = {}
        self._datasets: dict[tuple, DatasetRecord | None] = {}
        self.wall: dict[str, float] = {}  # trial id -> driver-side wall time, for ``bench study``

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; clients and run caches are rebuilt on restore.
        state = dict(self.__dict__)
        state.update(_mlc=None, _runs={}, _ended=set(), _logged={}, _start={}, _datasets={}, echo=None,
                     links=None)
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
        if self.links is not None:
            self.links.set_run(tid, run_id, run_url(self.uri, self.experiment_id, run_id))
        self._runs[tid] = run_id
        return run_id

    def dataset(self, cfg: Any) -> DatasetRecord | None:
        """The trial's data described once per distinct split (loaded in the driver, then cached)."""
        key = data_key(cfg)
        if key not in self._datasets:
            try:
                self._datasets[key] = dataset_record(cfg)
            except Exception:  # noqa: BLE001 - data only the workers can read: the trial itself will say
                self._datasets[key] = None
        return self._datasets[key]

    def _create(self, trial: Any) -> str:
        cfg = resolve_config(dict(trial.config))
        flat = cfg.to_dict()
        number = self.links.number(trial.trial_id) if self.links is not None else None
        prefix = "confirm" if self.role == "confirmation" else "trial"
        name = f"{prefix}-{number}" if number is not None else f"{prefix}-{trial.trial_id}"
        run = self.mlc.create_run(self.experiment_id, run_name=name, tags={
            PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, STUDY_TAG: self.study,
            ROLE_TAG: self.role})
        tags = {"method": flat["method"], "dataset": flat["dataset"], "imbalance": flat["imbalance"],
                "seed": flat["seed"], "trial_id": trial.trial_id, "git_commit": self.commit,
                STATUS_TAG: "running",
                **{f"{TUNED_PREFIX}{k}": v for k, v in active_values(self.params, dict(trial.config)).items()}}
        if number is not None:
            tags[NUMBER_TAG] = number
        if trial.config.get(PUBLISHED_KEY):
            tags[PUBLISHED_TAG] = "true"
        if trial.config.get(CONFIRMS_KEY):
            tags[CONFIRMS_TAG] = trial.config[CONFIRMS_KEY]
        if flat.get("feature_key"):
            tags["feature_key"] = flat["feature_key"]
        log_batch(self.mlc, run.info.run_id, params=params_as_strings(flat), tags=tags)
        self.mlc.log_text(run.info.run_id, yaml.safe_dump(flat, sort_keys=False), CONFIG_ARTIFACT)
        record = self.dataset(cfg)
        if record is not None:
            self.mlc.log_inputs(run.info.run_id, datasets=[record.to_mlflow()])
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
        tags = {STATUS_TAG: outcome, "early_stopped": str(outcome == "pruned").lower(),
                EPOCHS_TAG: int(last.get("epoch", 0))}
        if outcome == "failed":
            trace = _error_trace(trial) if errored else None
            tags["error"] = (why or _last_line(trace) or "trial raised an error")[:4000]
            if trace:
                self.mlc.log_text(run_id, trace, "error.txt")
        if trial.trial_id in self._start:
            self.wall[trial.trial_id] = time.time() - self._start[trial.trial_id]
            tags[WALL_TAG] = f"{self.wall[trial.trial_id]:.1f}"
        checkpoint = last.get("checkpoint_path") or getattr(trial.checkpoint, "path", None)
        if checkpoint:  # lets `--backbone RUN_ID` find the trained weights later
            tags[CHECKPOINT_TAG] = checkpoint
        log_batch(self.mlc, run_id, tags=tags)
        per_class = {k: last[k] for k in ("val_per_class", "test_per_class") if k in last}
        if per_class:
            self.mlc.log_dict(run_id, per_class, "per_class_accuracy.json")
            self._log_per_class_plot(run_id, trial, per_class)
        status = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[outcome]
        self.mlc.set_terminated(run_id, status)
        if self.echo is not None:
            self.echo(trial.trial_id, outcome, {**last, **({"failure": tags["error"]} if why or errored else {})})

    def _log_per_class_plot(self, run_id: str, trial: Any, per_class: dict[str, list[float]]) -> None:
        from ltstudy.study.plots import per_class_png

        record = self.dataset(resolve_config(dict(trial.config)))
        if record is None:
            return
        series = {k.split("_")[0]: v for k, v in per_class.items()}
        number = self.links.number(trial.trial_id) if self.links is not None else None
        label = f"trial {number}" if number is not None else trial.trial_id
        png = per_class_png(record.class_counts, series, f"{self.study}, {label}: accuracy per class",
                            record.many_threshold, record.few_threshold, record.class_names)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PER_CLASS_PLOT
            path.write_bytes(png)
            self.mlc.log_artifact(run_id, str(path))


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


class ProgressCallback(ray.tune.Callback):
    """Feeds a :class:`~ltstudy.study.progress.ProgressBoard` from Tune's hooks (driver side); labels
    trials by their Optuna number."""

    def __init__(self, board: Any, params: tuple[Param, ...], links: Any = None,
                 objectives: tuple[str, ...] = ()) -> None:
        self.board, self.params, self.links, self.objectives = board, params, links, tuple(objectives)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; a resumed study brings its own board.
        return {"board": None, "params": self.params, "links": None, "objectives": self.objectives}

    def label(self, trial: Any) -> str:
        number = self.links.number(trial.trial_id) if self.links is not None else None
        return f"trial {number}" if number is not None else f"trial {trial.trial_id}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.board is not None:
            self.board.start(trial.trial_id, self.label(trial), active_values(self.params, dict(trial.config)))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.board is not None:
            self.board.result(trial.trial_id, result.get("epoch"), result.get("epochs_total"),
                              result.get(self.board.metric))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def _end(self, trial: Any, errored: bool) -> None:
        if self.board is None:
            return
        last = trial.last_result or {}
        outcome, why = trial_outcome(last, errored, self.objectives)
        error = why or ("the trial raised an error" if errored else None)
        self.board.end(trial.trial_id, self.label(trial), outcome, int(last.get("epoch", 0)),
                       int(last.get("epochs_total", 0)), last.get(self.board.metric), error)
