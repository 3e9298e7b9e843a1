"""``ltstudy tune``: check everything, open the tracking records, run (or resume) the study, summarise it.

Order matters. :func:`plan_study` runs every check that can fail on user input — the options, the space,
the fixed settings, the dataset (built once on the driver), the backbone, the tracking store, the Ray
address — before anything is written, so a bad command leaves no trace anywhere. Only then does
:func:`run_study` open MLflow, save the study's options next to it and start Ray.

Interruption: ltstudy owns SIGINT and SIGTERM while a study runs. The first one asks Tune to stop
gracefully (Tune's SIGUSR1 handler: the loop ends and the experiment state is saved); the study run and
the trial runs still running are then marked KILLED, and :class:`~ltstudy.errors.StudyInterrupted`
carries the exact ``--resume`` command (exit code 130). A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ltstudy.config import PATH_KEYS
from ltstudy.errors import ConfigError, StudyInterrupted, TrackingWriteError
from ltstudy.study.options import StudyOptions, read_saved, write_saved
from ltstudy.study.space import SearchSpace, default_space_path, space_from_text
from ltstudy.study.tracking import (
    OPTUNA_STORAGE_TAG,
    StudyTracker,
    check_reachable,
    git_commit,
    resolve_backbone,
    resolve_tracking_uri,
)

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://")

__all__ = ["StudyOptions", "StudyPlan", "StudySummary", "plan_study", "run_study"]


@dataclass
class StudyPlan:
    opts: StudyOptions
    space: SearchSpace
    space_yaml: str  # the space file's text as the study started
    study: str
    storage: str
    experiment_path: str
    optuna_storage: str  # a journal file or an RDB URL holding every study's Optuna study
    tracking_uri: str
    fresh: bool
    seed: int  # the sampler's seed (derived from the study name unless --seed)
    max_t: int  # the trials' epochs: the budget early stopping works within
    grace: int  # ASHA's first rung
    phases: list[int] = field(default_factory=list)  # the latest schedule phase start per corner config
    rungs: tuple[int, ...] = ()  # ASHA's rung epochs: trials write a checkpoint there
    notes: list[str] = field(default_factory=list)  # one-line warnings for the user

    @property
    def space_text(self) -> str:
        import yaml

        return self.space_yaml + "\n# effective fixed settings (file + overrides)\n" + \
            yaml.safe_dump({"fixed": self.space.fixed}, sort_keys=False)

    def resume_command(self) -> str:
        o = self.opts
        parts = ["ltstudy tune --resume", f"--method {self.space.method}", f"--study-name {self.study}",
                 f"--storage {self.storage}", f"--tracking-uri {self.tracking_uri}"]
        if o.address:
            parts.append(f"--address {o.address}")
        return " ".join(parts)


@dataclass
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
        """One line when every trial failed: how many, and the most common error."""
        if not self.trials or any(t["status"] != "failed" for t in self.trials):
            return None
        errors: dict[str, int] = {}
        for t in self.trials:
            errors[t.get("error") or "unknown error"] = errors.get(t.get("error") or "unknown error", 0) + 1
        common, n = max(errors.items(), key=lambda kv: kv[1])
        return f"all {len(self.trials)} trials failed; most common error ({n} of {len(self.trials)}): {common}"


# ----------------------------------------------------------------------------------------------- plan
def _absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Relative local paths become absolute: Tune runs each trial in its own working folder."""
    out = dict(overrides)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            out[key] = str(Path(value).resolve())
    return out


def _backbone_pins(o: StudyOptions, pins: dict[str, Any]) -> dict[str, Any]:
    """Feature-stage studies: the backbone checkpoint and the data split it was trained on."""
    from ltstudy.features.extract import load_backbone_checkpoint
    from ltstudy.train.feature import CHECKED_KEYS

    value = o.backbone or pins.get("backbone")
    if not value:
        raise ConfigError(f"method {o.method!r} tunes on cached backbone features: pass --backbone "
                          "CHECKPOINT (a checkpoint.pt, its folder, or the MLflow run id of a trial)")
    state = load_backbone_checkpoint(resolve_backbone(str(value), o.tracking_uri))
    keys = (*CHECKED_KEYS, *(k for k in PATH_KEYS if k != "backbone"))
    data = {k: state["config"][k] for k in keys if state["config"].get(k) is not None}
    return {**data, **pins, "backbone": state["path"]}


def _feature_cache(values: dict[str, Any]) -> tuple[str, str]:
    """(storage URI, key) of the feature cache of ``values``, extracted here when missing."""
    from ltstudy.config import resolve_config
    from ltstudy.runtime import resolve_device
    from ltstudy.train.feature import resolve_features

    storage, key = resolve_features(resolve_config(values), resolve_device("auto"))
    return storage.uri, key


def _feature_pins(plan: StudyPlan, on_gpu: bool = False) -> dict[str, Any]:
    """Extract the backbone's features into the study's storage once, before any trial starts: as a Ray
    task on a GPU when the cluster has (or can get) one, else in this process."""
    space = plan.space
    values = {**space.fixed, **space.published_point(), "method": space.method, "feature_storage": plan.storage}
    if on_gpu:
        import ray

        uri, key = ray.get(ray.remote(num_cpus=1, num_gpus=1, max_retries=1)(_feature_cache).remote(values))
    else:
        uri, key = _feature_cache(values)
    return {"feature_storage": uri, "feature_key": key}


def _locate(o: StudyOptions, study: str) -> tuple[str, str, bool]:
    """(storage root, experiment path, whether a Tune experiment exists there)."""
    storage = o.storage or str(Path("ltstudy_results").resolve())
    if not storage.startswith(REMOTE_SCHEMES):
        storage = str(Path(storage).expanduser().resolve())
        if Path(storage).exists() and not Path(storage).is_dir():
            raise ConfigError(f"--storage {storage} is a file, not a folder")
        experiment_path = str(Path(storage) / study)
        return storage, experiment_path, (Path(experiment_path) / "tuner.pkl").is_file()
    from ray.tune import Tuner

    experiment_path = f"{storage.rstrip('/')}/{study}"
    return storage, experiment_path, Tuner.can_restore(experiment_path)


def _write_saved(plan: StudyPlan) -> None:
    write_saved(plan.experiment_path, {**plan.opts.saved(), "seed": plan.seed, "space_yaml": plan.space_yaml,
                                       "study": plan.study})


def _schedule_budget(space: SearchSpace, o: StudyOptions) -> tuple[int, list[int]]:
    """(the trials' epochs, the latest phase start of each corner configuration of the space)."""
    from ltstudy.config import resolve_config
    from ltstudy.train import phase_epochs

    if o.scheduler != "none" and "epochs" in space.tuned_names:
        raise ConfigError(f"{space.path}: 'epochs' is tuned, and early stopping would favour the short "
                          "runs; fix epochs (KEY=VALUE or fixed:) or pass --scheduler none")
    epochs = resolve_config({**space.fixed, **space.published_point(), "method": space.method}).train.epochs
    phases = [max(phase_epochs(resolve_config(c)), default=0) for c in space.corner_configs()]
    return epochs, phases


def plan_study(o: StudyOptions) -> StudyPlan:
    """Every user-input check, with nothing written anywhere."""
    from ltstudy.config import check_runnable, resolve_config
    from ltstudy.methods import get_method
    from ltstudy.study.checks import check_address, check_data
    from ltstudy.study.cluster import TrialShape, check_trial_shape, optuna_location
    from ltstudy.study.schedulers import first_rung, make_scheduler, rung_epochs
    from ltstudy.study.search import make_sampler, sampler_warning, study_seed

    if o.resume and not o.study_name:
        raise ConfigError("--resume needs --study-name (the study to continue)")
    saved: dict[str, Any] | None = None
    if o.resume:
        storage, experiment_path, exists = _locate(o, o.study_name)
        if not exists:
            raise ConfigError(f"--resume: no study {o.study_name!r} to continue under {storage}")
        saved = read_saved(experiment_path)
        o = o.for_resume(saved)
    get_method(o.method)
    o.check()
    check_trial_shape(TrialShape(o.workers, o.cpus_per_worker, o.gpus_per_worker))
    pins = dict(o.overrides)
    if get_method(o.method).stage == "feature":
        pins = _backbone_pins(o, pins)
    if saved is not None:
        space_yaml, where = saved["space_yaml"], f"the space of study {o.study_name}"
    else:
        path = Path(o.space_path) if o.space_path else default_space_path(o.method, pins.get("dataset"))
        if not path.is_file():
            raise ConfigError(f"search-space file not found: {path}")
        space_yaml, where = path.read_text(), str(path)
    space = space_from_text(space_yaml, where, o.method)
    for key in PATH_KEYS:
        if key in space.fixed and key not in pins:
            pins[key] = space.fixed[key]
    space = space.with_overrides(_absolute_paths(pins))
    check_runnable(resolve_config({**space.fixed, **space.published_point(), "method": space.method}))
    notes = []
    make_sampler(o.sampler, 0, o.num_trials)  # an unknown sampler is one line here
    if (warning := sampler_warning(o.sampler, o.num_trials)) and not o.resume:
        notes.append(warning)
    epochs, phases = _schedule_budget(space, o)
    grace = first_rung(phases, o.grace_period)
    scheduler = make_scheduler(o.scheduler, space.metric, space.mode, epochs, grace, o.reduction_factor,
                               state_dir=".")
    if o.scheduler != "none" and space.multi_objective:
        notes.append(f"multi-objective study: early stopping decides on the first objective, {space.metric}")
    study = o.study_name or f"{o.method}-{space.fixed.get('dataset', 'cifar10-lt')}-" \
                            f"{datetime.now():%Y%m%d-%H%M%S}"
    if "/" in study or not study.strip():
        raise ConfigError(f"--study-name {study!r} must be a non-empty name without '/'")
    storage, experiment_path, exists = _locate(o, study)
    optuna_storage = optuna_location(o.optuna_storage, storage, storage.startswith(REMOTE_SCHEMES))
    if exists and not o.resume:
        raise ConfigError(f"study {study!r} already exists under {storage}; pass --resume to continue it "
                          "or choose another --study-name")
    if o.confirm and space.multi_objective:
        raise ConfigError("--confirm ranks configurations by one objective; this study has "
                          f"{len(space.metrics)} ({', '.join(space.metrics)})")
    uri = resolve_tracking_uri(o.tracking_uri)
    check_reachable(uri)
    check_address(o.address)
    published = resolve_config({**space.fixed, **space.published_point(), "method": space.method})
    if not published.train.download:  # with download, run_study fetches it once (cluster.stage_data)
        check_data(published)
    seed = saved["seed"] if saved is not None else (o.seed if o.seed is not None else study_seed(study))
    return StudyPlan(o, space, space_yaml, study, storage, experiment_path, optuna_storage, uri,
                     not o.resume, seed, epochs, grace, phases, rungs=rung_epochs(scheduler), notes=notes)


# ------------------------------------------------------------------------------------------------ run
def _build_tuner(plan: StudyPlan, trainable: Any, callbacks: list[Any], concurrency: int):
    import ray.tune
    from ray.tune import Tuner

    from ltstudy.study.cluster import StudyConcurrency
    from ltstudy.study.runner import reuse_actors
    from ltstudy.study.schedulers import make_scheduler
    from ltstudy.study.search import make_searcher

    o = plan.opts
    if not plan.fresh:
        tuner = Tuner.restore(plan.experiment_path, trainable, resume_unfinished=True,
                              resume_errored=False)
        # The pickled callbacks would carry the old process's settings; use this run's, and this run's
        # concurrency (--max-concurrent, or what the cluster can hold).
        tuner._local_tuner.get_run_config().callbacks = callbacks
        limiter = tuner._local_tuner._tune_config.search_alg
        if isinstance(limiter, StudyConcurrency):
            limiter.set_max(concurrency)
        return tuner
    if "://" not in plan.optuna_storage:
        Path(plan.optuna_storage).parent.mkdir(parents=True, exist_ok=True)
    space = plan.space
    searcher = StudyConcurrency(make_searcher(space, o.sampler, plan.seed, o.num_trials, plan.study,
                                              plan.optuna_storage, fresh=True), max_concurrent=concurrency)
    scheduler = make_scheduler(o.scheduler, space.metric, space.mode, plan.max_t, plan.grace,
                               o.reduction_factor, state_dir=plan.experiment_path)
    return Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=o.num_trials,
                                        time_budget_s=o.time_budget, reuse_actors=reuse_actors(o.workers)),
        run_config=ray.tune.RunConfig(
            name=plan.study, storage_path=plan.storage, callbacks=callbacks, verbose=o.verbose,
            failure_config=ray.tune.FailureConfig(max_failures=o.retries),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def study_tags(plan: StudyPlan) -> dict[str, Any]:
    o, s = plan.opts, plan.space
    return {"ltstudy.method": s.method, "ltstudy.metric": ",".join(s.metrics),
            "ltstudy.mode": ",".join(s.modes), "ltstudy.sampler": o.sampler, "ltstudy.seed": plan.seed,
            "ltstudy.scheduler": o.scheduler, "ltstudy.grace_period": plan.grace,
            "ltstudy.reduction_factor": o.reduction_factor, "ltstudy.num_trials": o.num_trials,
            "ltstudy.workers": o.workers, "ltstudy.storage": plan.experiment_path,
            "ltstudy.tuned": ",".join(s.tuned_names), OPTUNA_STORAGE_TAG: plan.optuna_storage,
            "dataset": s.fixed.get("dataset", "cifar10-lt"), "git_commit": git_commit(),
            **({"ltstudy.feature_key": s.fixed["feature_key"]} if s.fixed.get("feature_key") else {})}


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet(verbose: int) -> None:
    """Below ``-v`` the study's own lines are the output: no MLflow/Optuna INFO logs or Optuna warnings."""
    if verbose > 0:
        return
    import warnings

    import mlflow  # noqa: F401 - configures its loggers on import; quieten them after that
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _study_dataset(plan: StudyPlan) -> tuple[Any, Any]:
    """The published configuration's dataset record, read before anything is written.

    On a local Ray the driver sees what the trials see, so unreadable data is bad input (one line, exit
    code 2); on a cluster (``--address``) the data may live on the workers only, and the record is left out.
    """
    from ltstudy.config import resolve_config
    from ltstudy.errors import LtstudyError
    from ltstudy.study.dataset import dataset_record

    space = plan.space
    cfg = resolve_config({**space.fixed, **space.published_point(), "method": space.method})
    try:
        return cfg, dataset_record(cfg)
    except LtstudyError:
        if plan.opts.address is None:
            raise
        return cfg, None
    except Exception:  # noqa: BLE001 - data on the workers only; the trials report their own errors
        return cfg, None


def _header(plan: StudyPlan, experiment_id: str, parent: str, concurrency: int) -> list[str]:
    from ltstudy.study.links import run_url

    o, s = plan.opts, plan.space
    return [
        f"study {plan.study}: {s.method} on {s.fixed.get('dataset', 'cifar10-lt')}, {o.num_trials} trials "
        f"({concurrency} at a time), sampler {o.sampler}, scheduler {o.scheduler}, {s.mode} {s.metric}"
        + (" (resumed)" if not plan.fresh else ""),
        f"MLflow: {run_url(plan.tracking_uri, experiment_id, parent)}" + (
            "" if plan.tracking_uri.startswith("http") else
            f"  (after: mlflow ui --backend-store-uri {plan.tracking_uri})"),
        f"Optuna: optuna-dashboard {plan.optuna_storage}",
    ]


def _trial_label(links: Any, trial: Any) -> str:
    number = links.number(trial.trial_id)
    return f"trial {number}" if number is not None else f"trial {trial.trial_id}"


def _drop_stale_optuna_study(plan: StudyPlan) -> None:
    """A fresh start under a name whose earlier start never reached Tune: its Optuna study is stale."""
    import optuna

    from ltstudy.study.search import open_optuna_storage

    if "://" not in plan.optuna_storage and not Path(plan.optuna_storage).is_file():
        return
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=plan.study, storage=open_optuna_storage(plan.optuna_storage))


@contextlib.contextmanager
def _interrupts() -> Iterator[SimpleNamespace]:
    """Own SIGINT/SIGTERM: the first asks Tune to stop gracefully (SIGUSR1), a second one stops at once."""
    caught = SimpleNamespace(signal=None)
    if signal.getsignal(signal.SIGINT) is None or not _main_thread():
        yield caught
        return

    def handler(signum: int, frame: Any) -> None:
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if caught.signal is not None or not tune_listens:
            caught.signal = caught.signal or signal.Signals(signum).name
            raise KeyboardInterrupt
        caught.signal = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune ends its loop and saves the experiment state

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    before = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if before is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_study(o: StudyOptions, echo: Callable[..., None] | None = None,
              say: Callable[[str], None] | None = None, console: Any = None) -> StudySummary:
    """Plan, record, run (or resume) and summarise one study.

    ``say`` gets one-line notices; ``console`` (a rich Console) gets the progress: a header with the
    MLflow and optuna-dashboard addresses, then a line per trial start and end (and a live footer on a
    terminal).
    """
    import optuna

    from ltstudy.methods import get_method
    from ltstudy.study.callbacks import MLflowTrialCallback, PlacementGroupReaper, ProgressCallback
    from ltstudy.study.cluster import TrialShape, place_study, stage_data
    from ltstudy.study.confirm import confirm_top
    from ltstudy.study.dataset import data_key
    from ltstudy.study.links import OptunaLinks, annotate_study, run_url
    from ltstudy.study.progress import ProgressBoard
    from ltstudy.study.runner import Resources, make_trainable, ray_init
    from ltstudy.study.search import open_optuna_storage
    from ltstudy.study.selection import Objectives
    from ltstudy.study.startup import StartupCallback
    from ltstudy.study.tracking import study_trials

    tic = time.time()
    _quiet(o.verbose)
    plan = plan_study(o)
    o = plan.opts
    if console is None:  # else with the summary, under its table: the progress stays one line per event
        for note in plan.notes:
            (say or print)(note)
    obj = Objectives(plan.space.metrics, plan.space.modes)
    if plan.fresh and "backbone" not in plan.space.fixed:  # with download: fetched once, here, before Ray
        values = {**plan.space.fixed, **plan.space.published_point(), "method": plan.space.method}
        if values.get("download"):
            plan.space = plan.space.with_overrides(stage_data(values, plan.storage,
                                                              plan.storage.startswith(REMOTE_SCHEMES)))
    started = ray_init(o.address, o.verbose)
    try:  # where trials go, and every node checked, before anything is recorded
        place = place_study(o.max_concurrent, TrialShape(o.workers, o.cpus_per_worker, o.gpus_per_worker),
                            plan.storage, plan.tracking_uri, plan.space.fixed, o.storage is not None)
        if plan.fresh and "backbone" in plan.space.fixed and get_method(o.method).stage == "feature":
            plan.space = plan.space.with_overrides(_feature_pins(plan, place.gpu_tasks))
        cfg, record = _study_dataset(plan)
        tracker = StudyTracker(plan.tracking_uri, plan.study)
        parent = tracker.open({**study_tags(plan), "ltstudy.max_concurrent": place.max_concurrent,
                               "ltstudy.cluster": place.describe()}, resume=not plan.fresh)
        if plan.fresh:
            if record is not None:
                tracker.mlc.log_inputs(parent, datasets=[record.to_mlflow()])
            _drop_stale_optuna_study(plan)
            _write_saved(plan)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    interrupted = None
    confirmed: list[dict[str, Any]] = []
    board = callback = None
    try:
        with _interrupts() as caught:
            if "://" not in plan.optuna_storage:
                Path(plan.optuna_storage).parent.mkdir(parents=True, exist_ok=True)
            links = OptunaLinks(open_optuna_storage(plan.optuna_storage), plan.study)
            callback = MLflowTrialCallback(plan.tracking_uri, tracker.experiment_id, parent, plan.study,
                                           git_commit(), echo if console is None else None,
                                           plan.space.params, links,
                                           objectives=plan.space.metrics)
            callback._datasets[data_key(cfg)] = record
            callbacks: list[Any] = [callback, PlacementGroupReaper()]
            if console is not None:
                for line in _header(plan, tracker.experiment_id, parent, place.max_concurrent):
                    console.print(line, soft_wrap=True, highlight=False, markup=False)
                board = ProgressBoard(console, plan.space.metric, plan.space.mode, o.num_trials,
                                      place.max_concurrent)
                if not plan.fresh:
                    board.seed([t["status"] for t in study_trials(tracker.mlc, tracker.experiment_id, parent)])
                callbacks.append(ProgressCallback(board, plan.space.params, links, plan.space.metrics))
            callbacks.insert(0, StartupCallback(o.workers, board.say if board is not None else say,
                                                lambda trial: _trial_label(links, trial)))
            trainable = make_trainable(Resources(o.workers, o.cpus_per_worker, o.gpus_per_worker, o.retries,
                                                 plan.storage, place.driver, place.backend, o.checkpoint_every,
                                                 plan.rungs))
            tuner = _build_tuner(plan, trainable, callbacks, place.max_concurrent)
            annotate_study(links.storage, plan.study, list(plan.space.metrics), {
                "mlflow_tracking_uri": plan.tracking_uri, "mlflow_experiment_id": tracker.experiment_id,
                "mlflow_study_run_id": parent,
                "mlflow_study_run": run_url(plan.tracking_uri, tracker.experiment_id, parent)})
            # Ray's new output engine prints its experiment header even at verbose 0; its legacy engine
            # prints nothing at 0
            with _env({"RAY_AIR_NEW_OUTPUT": "0"} if o.verbose == 0 else {}):
                tuner.fit()
            if not caught.signal and o.confirm:
                confirmed = confirm_top(plan, tracker, trainable, o.confirm, o.confirm_seeds,
                                        place.max_concurrent, echo)
        interrupted = caught.signal
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except BaseException:
        if callback is not None and (lost := callback.close(raise_errors=False)):
            print(f"error: {lost}", file=sys.stderr)  # the study's own error follows
        tracker.mlc.set_terminated(parent, "FAILED")
        raise
    finally:
        if board is not None:
            board.close()
        if started:
            import ray

            ray.shutdown()
    # every trial record written before the study run is summarised or marked interrupted; records of a
    # trial still running when the study stopped come back with --resume (it re-runs their epochs)
    try:
        lost = callback.close(raise_errors=not interrupted) if callback is not None else None
    except TrackingWriteError:  # the study ran, but its record is incomplete: no summary over it
        with contextlib.suppress(Exception):
            tracker.mlc.set_terminated(parent, "FAILED")
        raise
    if interrupted:
        stopped = tracker.interrupted(interrupted)
        raise StudyInterrupted(f"{interrupted}: study {plan.study} stopped, {stopped} running trial(s) "
                               f"killed, its state saved{f' ({lost})' if lost else ''}; resume with: "
                               f"{plan.resume_command()}")
    try:
        ot_study = optuna.load_study(study_name=plan.study, storage=open_optuna_storage(plan.optuna_storage))
    except KeyError:  # no trial was ever asked for
        ot_study = None
    result = tracker.finish(plan.space_text, obj, ot_study)
    trials = result["trials"]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    notes = list(plan.notes) if console is not None else []
    if o.time_budget and time.time() - tic >= o.time_budget and len(trials) < o.num_trials:
        notes.append(f"the time budget ({o.time_budget:.0f} s) ended the study after {len(trials)} of "
                     f"{o.num_trials} trials")
    return StudySummary(plan.study, obj.metric, obj.mode, result["best"], plan.space.tuned_names, counts,
                        plan.experiment_path, plan.tracking_uri, parent, time.time() - tic, dict(callback.wall),
                        trials, obj.metrics, obj.modes, result["front"], result["gain"], confirmed, notes)
