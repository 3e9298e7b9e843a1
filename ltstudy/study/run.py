"""``ltstudy tune``: plan the study, then prepare, fit and summarise it.

:func:`run_study` is the main line. :func:`~ltstudy.study.plan.plan_study` checks everything the user gave,
with nothing written. :func:`prepare` fetches data once, places the study on the cluster (every node
checked), extracts features once and opens the tracking records. :func:`fit` runs Tune (and the
confirmation runs). :func:`summarise` writes the study's answer onto its study run.

Interruption: ltstudy owns SIGINT and SIGTERM while a study runs. The first one asks Tune to stop
gracefully (Tune's SIGUSR1 handler: the loop ends and the experiment state is saved); the study run and
the trial runs still running are then marked KILLED, and :class:`~ltstudy.errors.StudyInterrupted`
carries the exact ``--resume`` command (exit code 130). A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow  # noqa: F401 - configures its loggers on import; process.quiet quietens them after that
import optuna
import ray.tune

from ltstudy.config import TrialConfig, stage_weights
from ltstudy.errors import LtstudyError, StudyInterrupted, TrackingWriteError
from ltstudy.methods import get_method
from ltstudy.study import _compat
from ltstudy.study.callbacks import ProgressCallback, StartupCallback
from ltstudy.study.cluster.placement import Placement, PlacementGroupReaper, place_study
from ltstudy.study.cluster.shape import TrialShape
from ltstudy.study.confirm import confirm_top
from ltstudy.study.data import extract_features_once, stage_data
from ltstudy.study.options import StudyOptions, write_saved
from ltstudy.study.plan import StudyPlan, plan_study
from ltstudy.study.process import interrupts, quiet, quiet_tuner_output
from ltstudy.study.progress import ProgressBoard
from ltstudy.study.ray_session import ray_init, shutdown_during, stop_ray
from ltstudy.study.results.selection import Objectives
from ltstudy.study.results.summary import StudySummary, record_summary
from ltstudy.study.search.budget import BudgetEnd, BudgetStopper, TimeBudget, activate
from ltstudy.study.search.concurrency import StudyConcurrency
from ltstudy.study.search.halving import HalvingSearch
from ltstudy.study.search.optuna_storage import open_optuna_storage, public_url
from ltstudy.study.search.schedulers import make_scheduler
from ltstudy.study.search.searcher import make_searcher
from ltstudy.study.storage import is_remote, write_marker
from ltstudy.study.tracking.callback import MLflowTrialCallback
from ltstudy.study.tracking.dataset import DatasetRecord, dataset_record
from ltstudy.study.tracking.links import OptunaLinks, annotate_study
from ltstudy.study.tracking.records import status_counts, study_trials
from ltstudy.study.tracking.store import client, git_commit, make_schema, run_url, sqlite_file
from ltstudy.study.tracking.study_run import StudyTracker
from ltstudy.study.trainable import Resources, make_trainable, reuse_actors

__all__ = ["StudyOptions", "StudyPlan", "StudySummary", "plan_study", "run_study"]


@dataclass(kw_only=True)
class PreparedStudy:
    """A study ready to fit: where its trials go and its tracking records, opened."""

    plan: StudyPlan
    place: Placement
    tracker: StudyTracker
    parent: str  # the study run
    cfg: TrialConfig  # the published configuration
    record: DatasetRecord | None  # its dataset, as MLflow shows it (None: the data is on the workers only)


def run_study(o: StudyOptions, echo: Callable[..., None] | None = None,
              say: Callable[[str], None] | None = None, console: Any = None) -> StudySummary:
    """Plan, prepare, fit (or resume) and summarise one study.

    ``say`` gets one-line notices; ``console`` (a rich Console) gets the progress: a header with the
    MLflow and optuna-dashboard addresses, then a line per trial start and end (and a live footer on a
    terminal); ``echo`` gets a line per confirmation run (and per trial, without a console).
    """
    tic = time.time()
    quiet(o.verbose)
    plan = plan_study(o)
    if console is None:  # else with the summary, under its table: the progress stays one line per event
        for note in plan.notes:
            (say or print)(note)
    plan = _stage_data(plan)
    warming = threading.Thread(target=_open_store, args=(plan.tracking_uri,), name="ltstudy-store", daemon=True)
    warming.start()  # while Ray starts: most of ray.init is waiting for Ray's own processes
    started = ray_init(plan.opts.address, plan.opts.verbose, dashboard=plan.opts.workers > 1)
    warming.join()
    try:
        study = prepare(plan)
        interrupted, callback, confirmed = fit(study, echo, say, console)
    except BaseException:
        if started:
            stop_ray()
        raise

    def summary() -> StudySummary:
        return summarise(study, interrupted, callback, confirmed, time.time() - tic, console is not None)

    return shutdown_during(summary) if started else summary()  # Ray's processes end while it is drawn


def _open_store(uri: str) -> None:
    """Open the MLflow store once (1-3 s: SQLAlchemy and the schema check); MLflow keeps one store per URI,
    so the study run opened later finds it ready. A SQLite file that does not exist yet is not made here
    (nothing is written before every node is checked): its schema is made aside, for the study run to copy
    (:func:`~ltstudy.study.tracking.store.make_schema`). A store that fails here fails again there, where the
    error is reported."""
    with contextlib.suppress(Exception):
        if (db := sqlite_file(uri)) is not None and not db.exists():
            make_schema(uri)
        else:
            client(uri)


def _stage_data(plan: StudyPlan) -> StudyPlan:
    """Pretrained weights and, with ``download``, the dataset (not a backbone's data) fetched once, here,
    before Ray starts."""
    if plan.fresh:
        plan = plan.with_fixed(stage_weights(plan.space.published_config(), plan.storage))
    values = plan.space.published_values()
    if not plan.fresh or "backbone" in plan.space.fixed or not values.get("download"):
        return plan
    return plan.with_fixed(stage_data(values, plan.storage, is_remote(plan.storage)))


def prepare(plan: StudyPlan) -> PreparedStudy:
    """Where trials go (every node checked) and features extracted once, before anything is recorded;
    then the study run opened and, on a fresh start, the study's options saved beside its results."""
    o = plan.opts
    place = place_study(o.max_concurrent, TrialShape(o.workers, o.cpus_per_worker, o.gpus_per_worker),
                        plan.storage, plan.tracking_uri, plan.space.fixed, o.storage is not None)
    if plan.fresh and "backbone" in plan.space.fixed and get_method(o.method).stage == "feature":
        plan = plan.with_fixed(extract_features_once(plan.space, plan.storage, place.gpu_tasks))
    cfg, record = _study_dataset(plan)
    tracker = StudyTracker(plan.tracking_uri, plan.study)
    parent = tracker.open({**plan.tags(), "ltstudy.max_concurrent": place.max_concurrent,
                           "ltstudy.cluster": place.describe()}, resume=not plan.fresh)
    if plan.fresh:
        if record is not None:
            tracker.mlc.log_inputs(parent, datasets=[record.to_mlflow()])
        _drop_stale_optuna_study(plan)
        write_saved(plan.experiment_path, plan.saved())
    write_marker(plan.experiment_path, plan.study)  # on --resume too: a study started before markers
    if "://" not in plan.optuna_storage:
        Path(plan.optuna_storage).parent.mkdir(parents=True, exist_ok=True)
    return PreparedStudy(plan=plan, place=place, tracker=tracker, parent=parent, cfg=cfg, record=record)


def _study_dataset(plan: StudyPlan) -> tuple[TrialConfig, DatasetRecord | None]:
    """The published configuration's dataset record, read before anything is written.

    On a local Ray the driver sees what the trials see, so unreadable data is bad input (one line, exit
    code 2); on a cluster (``--address``) the data may live on the workers only, and the record is left out.
    """
    cfg = plan.space.published_config()
    try:
        return cfg, dataset_record(cfg)
    except LtstudyError:
        if plan.opts.address is None:
            raise
        return cfg, None
    except Exception:  # noqa: BLE001 - data on the workers only; the trials report their own errors
        return cfg, None


def _drop_stale_optuna_study(plan: StudyPlan) -> None:
    """A fresh start under a name whose earlier start never reached Tune: its Optuna study is stale."""
    if "://" not in plan.optuna_storage and not Path(plan.optuna_storage).is_file():
        return
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=plan.study, storage=open_optuna_storage(plan.optuna_storage))


def fit(study: PreparedStudy, echo: Callable[..., None] | None, say: Callable[[str], None] | None,
        console: Any) -> tuple[str | None, MLflowTrialCallback | None, list[dict[str, Any]]]:
    """Run (or resume) the trials, then the confirmation runs; returns (the signal that interrupted the
    study or None, the MLflow callback, the confirmed ranking)."""
    plan, o = study.plan, study.plan.opts
    board = callback = None
    try:
        with interrupts() as caught:
            links = OptunaLinks(open_optuna_storage(plan.optuna_storage), plan.study)
            callback = MLflowTrialCallback(
                plan.tracking_uri, study.tracker.experiment_id, study.parent, plan.study, commit=git_commit(),
                echo=echo if console is None else None, params=plan.space.params, links=links,
                objectives=plan.space.metrics, fresh=plan.fresh)
            callback.add_dataset(study.cfg, study.record)
            board = _board(study, console)
            trainable = make_trainable(Resources.of(o, storage=plan.storage, placement=study.place,
                                                    checkpoint_epochs=plan.rungs))
            budget = TimeBudget(o.time_budget) if o.time_budget else None
            callbacks = _callbacks(study, callback, board, links, say) + ([BudgetEnd(budget)] if budget else [])
            tuner = _tuner(plan, trainable, callbacks, study.place.max_concurrent, budget)
            _annotate(study, links)
            activate(budget)
            try:
                with quiet_tuner_output(o.verbose):
                    tuner.fit()
            finally:
                activate(None)
            confirmed = [] if caught.signal or not o.confirm else confirm_top(
                plan, study.tracker, trainable, o.confirm, o.confirm_seeds, study.place.max_concurrent, echo)
        return caught.signal, callback, confirmed
    except KeyboardInterrupt:
        return "SIGINT", callback, []
    except BaseException:
        if callback is not None and (lost := callback.close(raise_errors=False)):
            print(f"error: {lost}", file=sys.stderr)  # the study's own error follows
        study.tracker.mlc.set_terminated(study.parent, "FAILED")
        raise
    finally:
        if board is not None:
            board.close()


def _board(study: PreparedStudy, console: Any) -> ProgressBoard | None:
    """With a console: the header printed and the progress board (seeded with a resumed study's trials)."""
    if console is None:
        return None
    plan = study.plan
    for line in _header(plan, study.tracker.experiment_id, study.parent, study.place.max_concurrent):
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    board = ProgressBoard(console, plan.space.metric, plan.space.mode, plan.tune_trials,
                          study.place.max_concurrent)
    if not plan.fresh:
        board.seed(study_trials(study.tracker.mlc, study.tracker.experiment_id, study.parent))
    return board


def _callbacks(study: PreparedStudy, callback: MLflowTrialCallback, board: ProgressBoard | None,
               links: OptunaLinks, say: Callable[[str], None] | None) -> list[Any]:
    """Start-up stages first (the others then see them in the first result), MLflow, the reaper, progress."""
    space = study.plan.space
    callbacks: list[Any] = [StartupCallback(study.plan.opts.workers, board.say if board is not None else say,
                                            lambda trial: _trial_label(links, trial)),
                            callback, PlacementGroupReaper()]
    if board is not None:
        callbacks.append(ProgressCallback(board, space.params, links, space.metrics))
    return callbacks


def _tuner(plan: StudyPlan, trainable: Any, callbacks: list[Any], concurrency: int,
           budget: TimeBudget | None = None) -> ray.tune.Tuner:
    """A new Tuner, or the saved one restored with this run's callbacks, concurrency and time budget."""
    o, space = plan.opts, plan.space
    if not plan.fresh:
        tuner = ray.tune.Tuner.restore(plan.experiment_path, trainable, resume_unfinished=True,
                                       resume_errored=False)
        # the pickled callbacks would carry the old process's settings; use this run's, and this run's
        # concurrency (--max-concurrent, or what the cluster can hold) and budget (--time-budget, or none)
        run_config = _compat.tuner_run_config(tuner)
        run_config.callbacks = callbacks
        limiter = _compat.tuner_search_alg(tuner)
        if isinstance(limiter, StudyConcurrency):
            limiter.set_max(concurrency)
            limiter.set_budget(budget)
        return tuner
    halving = {"cls": HalvingSearch, "budgets": plan.budgets, "full_epochs": plan.max_t,
               "warmup_epochs": space.published_config().train.warmup_epochs} if plan.budgets else {}
    searcher = StudyConcurrency(make_searcher(space, o.sampler, plan.seed, o.num_trials, plan.study,
                                              plan.optuna_storage, fresh=True, **halving),
                                max_concurrent=concurrency)
    searcher.set_budget(budget)
    scheduler = make_scheduler(o.scheduler, space.metric, space.mode, plan.max_t, plan.grace,
                               o.reduction_factor, state_dir=plan.experiment_path)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.tune_trials,
                                        reuse_actors=reuse_actors(o.workers)),
        run_config=ray.tune.RunConfig(
            name=plan.study, storage_path=plan.storage, callbacks=callbacks, verbose=o.verbose,
            stop=BudgetStopper(),
            failure_config=ray.tune.FailureConfig(max_failures=o.retries),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def _annotate(study: PreparedStudy, links: OptunaLinks) -> None:
    """The objective names and the MLflow study run on the Optuna study."""
    plan, tracker = study.plan, study.tracker
    annotate_study(links.storage, plan.study, list(plan.space.metrics), {
        "mlflow_tracking_uri": public_url(plan.tracking_uri), "mlflow_experiment_id": tracker.experiment_id,
        "mlflow_study_run_id": study.parent,
        "mlflow_study_run": run_url(plan.tracking_uri, tracker.experiment_id, study.parent)})


def _header(plan: StudyPlan, experiment_id: str, parent: str, concurrency: int) -> list[str]:
    o, s = plan.opts, plan.space
    return [
        f"study {plan.study}: {s.method} on {s.dataset}, {plan.tune_trials} trials "
        f"({concurrency} at a time), sampler {o.sampler}, scheduler {o.scheduler}, {s.mode} {s.metric}"
        + (" (resumed)" if not plan.fresh else ""),
        f"MLflow: {run_url(public_url(plan.tracking_uri), experiment_id, parent)}" + (
            "" if plan.tracking_uri.startswith("http") else
            f"  (after: mlflow ui --backend-store-uri {public_url(plan.tracking_uri)})"),
        f"Optuna: optuna-dashboard {public_url(plan.optuna_storage)}",
    ]


def _trial_label(links: OptunaLinks, trial: Any) -> str:
    number = links.number(trial.trial_id)
    return f"trial {number}" if number is not None else f"trial {trial.trial_id}"


def summarise(study: PreparedStudy, interrupted: str | None, callback: MLflowTrialCallback | None,
              confirmed: list[dict[str, Any]], wall_s: float, with_notes: bool) -> StudySummary:
    """Every trial record written, then the study's answer on its study run; an interrupted study is
    marked so and raises :class:`~ltstudy.errors.StudyInterrupted` with the command that resumes it."""
    plan, tracker = study.plan, study.tracker
    try:  # records of a trial still running when the study stopped come back with --resume
        lost = callback.close(raise_errors=not interrupted) if callback is not None else None
    except TrackingWriteError:  # the study ran, but its record is incomplete: no summary over it
        with contextlib.suppress(Exception):
            tracker.mlc.set_terminated(study.parent, "FAILED")
        raise
    if interrupted:
        stopped = tracker.interrupted(interrupted)
        raise StudyInterrupted(f"{interrupted}: study {plan.study} stopped, {stopped} running trial(s) "
                               f"killed, its state saved{f' ({lost})' if lost else ''}; resume with: "
                               f"{plan.resume_command()}")
    obj = Objectives(plan.space.metrics, plan.space.modes)
    result = record_summary(tracker, plan.space_text, obj)
    trials, o = result["trials"], plan.opts
    notes = list(plan.notes) if with_notes else []
    if o.time_budget and wall_s >= o.time_budget and (note := _budget_note(plan, trials)):
        notes.append(note)
    summary = StudySummary(
        study=plan.study, metric=obj.metric, mode=obj.mode, best=result["best"], tuned=plan.space.tuned_names,
        counts=status_counts(trials), experiment_path=plan.experiment_path, tracking_uri=plan.tracking_uri,
        parent_run_id=study.parent, wall_s=wall_s, trial_wall_s=dict(callback.wall) if callback else {},
        trials=trials, metrics=obj.metrics, modes=obj.modes, front=result["front"], gain=result["gain"],
        confirmed=confirmed, notes=notes)
    if summary.failure():  # the study did not do its job: its run says so too
        tracker.mlc.set_terminated(study.parent, "FAILED")
    return summary


def _budget_note(plan: StudyPlan, trials: list[dict[str, Any]]) -> str | None:
    """How the time budget ended the study: the trials it cut and those it left unstarted."""
    cut = sum(t["status"] == "budget" for t in trials)
    left = max(plan.tune_trials - len(trials), 0)
    if not cut and not left:
        return None
    return (f"the time budget ({plan.opts.time_budget:.0f} s) ended the study: {cut} running trial(s) cut "
            f"(status budget), {left} of {plan.tune_trials} not started; continue with: "
            f"{plan.resume_command()}")
