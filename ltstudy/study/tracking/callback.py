"""The Ray Tune callback that records a study in MLflow: one child run per trial.

Why not Ray's ``MLflowLoggerCallback``: it has no parent/child nesting, sends one request per metric, and
opens a second run for a trial that is restored after a crash (ray#48664). :class:`MLflowTrialCallback`
uses ``log_batch``, nests each trial under the study run with ``mlflow.parentRunId``, and finds an existing
run by the ``ltstudy.trial_id`` tag before creating one, so every trial has exactly one run even across
``ltstudy tune --resume``. It makes no MLflow call on Tune's controller thread: a background writer
(:mod:`ltstudy.study.tracking.writer`) does, and the hooks wait for it only where a record could be lost.

Each trial run also says what a person looks for first: the tuned values it used (``tuned.<name>`` tags,
only the parameters that were active), its Optuna trial number (and the run id on the Optuna trial, see
:mod:`ltstudy.study.tracking.links`), the dataset as an MLflow dataset input, and, once finished, its per-class
accuracy plotted head to tail.
"""

from __future__ import annotations

import time
from typing import Any

import ray.tune
import yaml
from mlflow.entities import Metric

from ltstudy.config import BUDGET_KEY, CONFIRMS_KEY, PUBLISHED_KEY, TrialConfig, resolve_config
from ltstudy.errors import TrackingWriteError
from ltstudy.study import _compat
from ltstudy.study.search.schedulers import CHECKPOINTED_KEY
from ltstudy.study.search.space import Param, active_values
from ltstudy.study.tracking.dataset import DatasetRecord, data_key, dataset_record
from ltstudy.study.tracking.store import (
    BUDGET_TAG,
    CHECKPOINT_TAG,
    CONFIG_ARTIFACT,
    CONFIRMS_TAG,
    ENDED,
    EPOCHS_TAG,
    NUMBER_TAG,
    PARENT_TAG,
    PUBLISHED_TAG,
    RELIABILITY_JSON,
    ROLE_TAG,
    RUN_STATUS,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TUNED_PREFIX,
    WALL_TAG,
    is_metric,
    log_batch,
    params_as_strings,
    run_url,
    trial_metrics,
    trial_outcome,
)
from ltstudy.study.tracking.writer import OpenRun, RunWriter

#: what a trial reports at every evaluation that only its end record needs (per-class accuracy, the
#: calibration bins): kept by the callback, off Tune's trial state. Tune writes every trial's state at every
#: experiment save, and the study saves whenever a trial is added: with these lists, 55 KB a trial on 4
#: synthetic classes (1,000 trials: a 55 MB file per save) and far more on 1,000 classes. With the study's
#: objectives known, every metric but them is kept aside too: Tune keeps six running statistics and two
#: windows of recent values of every numeric key of a trial's last result (23 of a trial's 42 KB for 45
#: metrics), and nothing in Tune or the driver reads more than the objectives, ``epoch`` and Tune's own keys.
BULKY = ("val_per_class", "test_per_class", "val_reliability", "test_reliability")
#: kept off Tune's trial state besides the metrics: the lists above, and the flag that a result brought a
#: checkpoint (the scheduler has read it; in the state it would be one more running statistic per trial)
OFF_STATE = (*BULKY, CHECKPOINTED_KEY)


class MLflowTrialCallback(ray.tune.Callback):
    """One child run per Tune trial, found again by tag on restore; written off the controller thread.

    The hooks only hand records to a :class:`~ltstudy.study.tracking.writer.RunWriter` (finding or creating
    the run, the per-epoch metrics, the end of the trial), except that they wait for records to be written
    where one could otherwise be lost for good: when Tune saves the experiment state a resumed study
    restarts from (:meth:`get_state`: every result that state holds is on the store first), at a result that
    ends the trial (the searcher finishes the Optuna trial before ``on_trial_complete``, after which its run
    link cannot be set) and when the trial ends, before its end line is printed. :meth:`close` writes the
    rest when the study ends.
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str, *,
                 commit: str = "unknown", echo: Any = None, params: tuple[Param, ...] = (),
                 links: Any = None, objectives: tuple[str, ...] = (), role: str = "trial",
                 fresh: bool = False) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        # a study started afresh: no run carries one of its trials' ids before this process makes it, so
        # a trial's run is created without searching the experiment for it (a search that grows with the
        # runs); a restored callback (Tune's pickle of a resumed study) always searches
        self.fresh = fresh
        self.study, self.commit, self.echo = study, commit, echo
        self.params, self.links = params, links  # the tuned parameters; tracking.links.OptunaLinks
        self.objectives, self.role = tuple(objectives), role
        self._writer: RunWriter | None = None
        self._opened: set[str] = set()  # trials whose run the writer was asked to open
        self._start: dict[str, float] = {}
        self._datasets: dict[tuple, DatasetRecord | None] = {}
        self.wall: dict[str, float] = {}  # trial id -> driver-side wall time, for ``bench study``
        self._bulky: dict[str, dict[str, Any]] = {}  # trial id -> its latest values kept off Tune's state

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; the writer (a thread) and caches are rebuilt on restore.
        state = dict(self.__dict__)
        state.update(_writer=None, _opened=set(), _start={}, _datasets={}, echo=None, links=None, fresh=False)
        return state

    @property
    def writer(self) -> RunWriter:
        if self._writer is None:
            self._writer = RunWriter(self.uri)
        return self._writer

    def close(self, raise_errors: bool = True) -> str | None:
        """Write every record still queued (see :meth:`RunWriter.close` for the bound). Raises
        :class:`~ltstudy.errors.TrackingWriteError` naming the records that were not written; with
        ``raise_errors=False`` returns its message instead (None when everything was written)."""
        if self._writer is None:
            return None
        try:
            self._writer.close()
        except TrackingWriteError as exc:
            if raise_errors:
                raise
            return str(exc)
        return None

    def _open(self, trial: Any) -> None:
        tid = trial.trial_id
        if tid not in self._opened:
            self._opened.add(tid)
            config = dict(trial.config)
            self.writer.open(tid, lambda mlc: self._find_or_create(mlc, tid, config))

    def _find_or_create(self, mlc: Any, tid: str, config: dict[str, Any]) -> OpenRun:
        """The trial's run (writer thread): found by its trial-id tag, else created and described."""
        found = [] if self.fresh else \
            mlc.search_runs([self.experiment_id], f"tags.`{TRIAL_TAG}` = '{tid}'", max_results=5)
        tags = found[0].data.tags if found else {}
        if tags.get(STATUS_TAG) in ENDED:
            # the trial ended before the driver died, but Tune's state had not caught up: it replays
            # the trial from its final checkpoint; its record is complete and stays as it is (its status
            # set, should the driver have died between the end tags and the run's end)
            run = OpenRun(found[0].info.run_id, ended=True)
            if found[0].info.status == "RUNNING":
                mlc.set_terminated(run.run_id, RUN_STATUS[tags[STATUS_TAG]])
        elif STATUS_TAG in tags:
            # a trial restored from its last Tune checkpoint re-runs the epochs after it; the epochs it
            # logged before the driver stopped are reproduced exactly, so they are not logged again
            history = mlc.get_metric_history(found[0].info.run_id, "train_loss")
            run = OpenRun(found[0].info.run_id, logged=max((m.step for m in history), default=0))
            mlc.update_run(run.run_id, status="RUNNING")
            log_batch(mlc, run.run_id, tags={STATUS_TAG: "running"})
        else:  # new, or created by an attempt that stopped before describing it
            run = OpenRun(found[0].info.run_id if found else self._create(mlc, tid))
            self._describe(mlc, run.run_id, tid, config)
        if self.links is not None:
            self.links.set_run(tid, run.run_id, run_url(self.uri, self.experiment_id, run.run_id))
        return run

    def add_dataset(self, cfg: TrialConfig, record: DatasetRecord | None) -> None:
        """The dataset record of ``cfg``'s split, when the driver has already read it."""
        self._datasets[data_key(cfg)] = record

    def dataset(self, cfg: Any) -> DatasetRecord | None:
        """The trial's data described once per distinct split (loaded in the driver, then cached)."""
        key = data_key(cfg)
        if key not in self._datasets:
            try:
                self._datasets[key] = dataset_record(cfg)
            except Exception:  # noqa: BLE001 - data only the workers can read: the trial itself will say
                self._datasets[key] = None
        return self._datasets[key]

    def _create(self, mlc: Any, tid: str) -> str:
        number = self.links.number(tid) if self.links is not None else None
        prefix = "confirm" if self.role == "confirmation" else "trial"
        name = f"{prefix}-{number}" if number is not None else f"{prefix}-{tid}"
        run = mlc.create_run(self.experiment_id, run_name=name, tags={
            PARENT_TAG: self.parent_run_id, TRIAL_TAG: tid, STUDY_TAG: self.study, ROLE_TAG: self.role})
        return run.info.run_id

    def _describe(self, mlc: Any, run_id: str, tid: str, config: dict[str, Any]) -> None:
        cfg = resolve_config(dict(config))
        flat = cfg.to_dict()
        number = self.links.number(tid) if self.links is not None else None
        tags = {"method": flat["method"], "dataset": flat["dataset"], "imbalance": flat["imbalance"],
                "seed": flat["seed"], "trial_id": tid, "git_commit": self.commit, STATUS_TAG: "running",
                **{f"{TUNED_PREFIX}{k}": v for k, v in active_values(self.params, config).items()}}
        if number is not None:
            tags[NUMBER_TAG] = number
        if config.get(PUBLISHED_KEY):
            tags[PUBLISHED_TAG] = "true"
        if config.get(CONFIRMS_KEY):
            tags[CONFIRMS_TAG] = config[CONFIRMS_KEY]
        if config.get(BUDGET_KEY):
            tags[BUDGET_TAG] = config[BUDGET_KEY]
        if flat.get("feature_key"):
            tags["feature_key"] = flat["feature_key"]
        mlc.log_text(run_id, yaml.safe_dump(flat, sort_keys=False), CONFIG_ARTIFACT)
        record = self.dataset(cfg)
        if record is not None:
            mlc.log_inputs(run_id, datasets=[record.to_mlflow()])
        # the status tag last: a run that has it is fully described (see _find_or_create)
        log_batch(mlc, run_id, params=params_as_strings(flat), tags=tags)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._start[trial.trial_id] = time.time()
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._open(trial)
        if "epoch" in result:
            step, now = int(result["epoch"]), int(time.time() * 1000)
            metrics = [Metric(k, v, now, step) for k, v in trial_metrics(result).items()]
            self.writer.log(trial.trial_id, step, metrics, {"node_id": result["node_id"]} if result.get("node_id")
                            else None)
        if result.get("done") or result.get("failure"):
            self.writer.flush(trial.trial_id)
        # Tune lets callbacks change the result before it becomes the trial's last result (and its metric
        # statistics), which Tune writes for every trial at every experiment save; the scheduler and the
        # searcher have seen the whole result already (a flattened copy)
        # (numbers only: Tune keeps statistics of those; a string such as the placement group's id is read back)
        keep = set(self.objectives)
        aside = [k for k, v in result.items() if k in OFF_STATE
                 or (keep and k not in keep and is_metric(k) and isinstance(v, (int, float)))]
        if aside:
            self._bulky.setdefault(trial.trial_id, {}).update({k: result.pop(k) for k in aside})

    def get_state(self) -> dict[str, Any] | None:
        """Called by Tune as it saves the experiment state (before uploading it) that ``--resume`` restarts
        from: a trial resumes after the checkpoint that state names and never reports the epochs before it
        again, so their records are written first. Tune sets its saving period to 19 times what a save takes,
        this wait included. Nothing to save: on restore, the runs are found again by tag."""
        if self._writer is not None:
            self._writer.flush()
        return None

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # the checkpoint's copy of its result is the result as kept on the trial's state (above), not whole
        _compat.slim_latest_checkpoint(trial, {k: v for k, v in (trial.last_result or {}).items() if k != "config"})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, errored=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._writer is not None:
            self._writer.flush()

    def _end(self, trial: Any, errored: bool) -> None:
        tid = trial.trial_id
        self._open(trial)
        last = {**dict(trial.last_result or {}), **self._bulky.pop(tid, {})}
        outcome, why = trial_outcome(last, errored, self.objectives)
        tags = {STATUS_TAG: outcome, "early_stopped": str(outcome == "pruned").lower(),
                EPOCHS_TAG: int(last.get("epoch", 0))}
        trace = None
        if outcome == "failed":
            trace = _error_trace(trial) if errored else why  # a NaN objective or a reported failure too
            tags["error"] = (why or _last_line(trace) or "trial raised an error")[:4000]
        wall = time.time() - self._start[tid] if tid in self._start else None
        if wall is not None:
            tags[WALL_TAG] = f"{wall:.1f}"
        checkpoint = last.get("checkpoint_path") or getattr(trial.checkpoint, "path", None)
        if checkpoint:  # lets `--backbone RUN_ID` find the trained weights later
            tags[CHECKPOINT_TAG] = checkpoint
        status = RUN_STATUS[outcome]
        config = dict(trial.config)
        self.writer.call(tid, lambda mlc, run: self._finish(mlc, run.run_id, tid, config, last, tags, trace, status),
                         "end of trial")
        self.writer.flush(tid)  # the end line below promises a complete record
        run = self.writer.run(tid)
        if run is not None and run.ended:
            return
        if wall is not None:
            self.wall[tid] = wall
        if self.echo is not None:
            self.echo(tid, outcome, {**last, **({"failure": tags["error"]} if why or errored else {})})

    def _finish(self, mlc: Any, run_id: str, tid: str, config: dict[str, Any], last: dict[str, Any],
                tags: dict[str, Any], trace: str | None, status: str) -> None:
        """A trial's end (writer thread): outcome tags, error text, per-class accuracy and calibration bins,
        status. No figure is drawn here: a trial's end holds up the next trial's start, and two matplotlib
        figures cost about a second of a 2-core machine; ``ltstudy report`` draws the study's figures from
        these records, once (:func:`~ltstudy.study.results.plots.study_pngs`)."""
        log_batch(mlc, run_id, tags=tags)
        if trace:
            mlc.log_text(run_id, trace, "error.txt")
        per_class = {k: last[k] for k in ("val_per_class", "test_per_class") if k in last}
        if per_class:
            mlc.log_dict(run_id, per_class, "per_class_accuracy.json")
        reliability = reliability_of(last)
        if reliability:  # the calibration of the last evaluation: its bins
            mlc.log_dict(run_id, reliability, RELIABILITY_JSON)
        mlc.set_terminated(run_id, status)


def reliability_of(result: dict[str, Any]) -> dict[str, dict[str, list]]:
    """``{"val": bins, "test": bins}`` of a trial's last result (nested, or flattened by Tune as
    ``val_reliability/count``); splits without bins are left out."""
    out = {}
    for split in ("val", "test"):
        bins = result.get(f"{split}_reliability")
        if not isinstance(bins, dict):
            bins = {k: result.get(f"{split}_reliability/{k}") for k in ("count", "confidence", "accuracy")}
        if all(isinstance(bins.get(k), list) for k in ("count", "confidence", "accuracy")):
            out[split] = {k: bins[k] for k in ("count", "confidence", "accuracy")}
    return out


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
