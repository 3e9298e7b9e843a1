"""``ltstudy tune``: validate everything, open the tracking records, then build or restore the Tuner.

Order matters: every check that can fail on user input (space file, overrides, resources, storage,
tracking server) runs in :func:`plan_study` before anything is written, so a bad command leaves no
trace in the tracking store or the storage folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ltstudy.config import PATH_KEYS
from ltstudy.errors import ConfigError
from ltstudy.study.space import SearchSpace, default_space_path, load_space
from ltstudy.study.tracking import (
    StudyTracker,
    check_reachable,
    git_commit,
    resolve_backbone,
    resolve_tracking_uri,
)

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://")


@dataclass
class StudyOptions:
    method: str
    space_path: str | None = None
    num_trials: int = 8
    max_concurrent: int | None = None
    sampler: str = "tpe"
    scheduler: str = "asha"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    storage: str | None = None
    tracking_uri: str | None = None
    study_name: str | None = None
    address: str | None = None
    resume: bool = False
    seed: int | None = 0
    backbone: str | None = None  # feature-stage methods: a checkpoint, or the MLflow run of a trial
    overrides: dict[str, Any] = field(default_factory=dict)
    retries: int = 1
    grace_period: int = 1
    reduction_factor: int = 2
    verbose: int = 1


@dataclass
class StudyPlan:
    opts: StudyOptions
    space: SearchSpace
    space_text: str
    study: str
    storage: str
    experiment_path: str
    optuna_storage: str  # a journal file or an RDB URL holding every study's Optuna study
    tracking_uri: str
    fresh: bool


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


def _absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """Relative local paths become absolute: Tune runs each trial in its own working folder."""
    out = dict(overrides)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
            out[key] = str(Path(value).resolve())
    return out


def _check_resources(o: StudyOptions) -> None:
    if o.num_trials < 1:
        raise ConfigError("--num-trials must be at least 1")
    if o.max_concurrent is not None and o.max_concurrent < 1:
        raise ConfigError("--max-concurrent must be at least 1")
    if o.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if o.cpus_per_worker <= 0:
        raise ConfigError("--cpus-per-worker must be > 0")
    if o.gpus_per_worker < 0 or (o.gpus_per_worker > 1 and not float(o.gpus_per_worker).is_integer()):
        raise ConfigError("--gpus-per-worker must be a fraction of one GPU (0.25, 0.5, ...) or a whole number")
    if o.retries < 0:
        raise ConfigError("--retries must be >= 0")


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


def _feature_pins(plan: StudyPlan) -> dict[str, Any]:
    """Extract the backbone's features into the study's storage once, before any trial starts."""
    from ltstudy.config import resolve_config
    from ltstudy.train.feature import resolve_features

    space = plan.space
    cfg = resolve_config({**space.fixed, **space.published_point(), "method": space.method,
                          "feature_storage": plan.storage})
    storage, key = resolve_features(cfg)
    return {"feature_storage": storage.uri, "feature_key": key}


def plan_study(o: StudyOptions) -> StudyPlan:
    """Every user-input check, with nothing written anywhere."""
    from ltstudy.config import check_runnable, resolve_config
    from ltstudy.methods import get_method
    from ltstudy.study.search import OPTUNA_JOURNAL, make_sampler, make_scheduler

    get_method(o.method)
    _check_resources(o)
    pins = dict(o.overrides)
    if get_method(o.method).stage == "feature":
        pins = _backbone_pins(o, pins)
    path = Path(o.space_path) if o.space_path else default_space_path(o.method, pins.get("dataset"))
    space = load_space(path, o.method)
    for key in PATH_KEYS:
        if key in space.fixed and key not in pins:
            pins[key] = space.fixed[key]
    space = space.with_overrides(_absolute_paths(pins))
    check_runnable(resolve_config({**space.fixed, **space.published_point(), "method": space.method}))
    make_sampler(o.sampler, o.seed)
    make_scheduler(o.scheduler, space.metric, space.mode, space.max_epochs())
    study = o.study_name or f"{o.method}-{space.fixed.get('dataset', 'cifar10-lt')}-" \
                            f"{datetime.now():%Y%m%d-%H%M%S}"
    if "/" in study or not study.strip():
        raise ConfigError(f"--study-name {study!r} must be a non-empty name without '/'")
    storage = o.storage or str(Path("ltstudy_results").resolve())
    if not storage.startswith(REMOTE_SCHEMES):
        storage = str(Path(storage).expanduser().resolve())
        if Path(storage).exists() and not Path(storage).is_dir():
            raise ConfigError(f"--storage {storage} is a file, not a folder")
        experiment_path = str(Path(storage) / study)
        exists = (Path(experiment_path) / "tuner.pkl").is_file()
        optuna_storage = str(Path(storage) / OPTUNA_JOURNAL)
    else:
        from ray.tune import Tuner

        experiment_path = f"{storage.rstrip('/')}/{study}"
        exists = Tuner.can_restore(experiment_path)
        optuna_storage = str(Path("~/.cache/ltstudy").expanduser() / OPTUNA_JOURNAL)
    if o.resume and not exists:
        raise ConfigError(f"--resume: no study {study!r} to continue under {storage}")
    if exists and not o.resume:
        raise ConfigError(f"study {study!r} already exists under {storage}; pass --resume to continue it "
                          "or choose another --study-name")
    uri = resolve_tracking_uri(o.tracking_uri)
    check_reachable(uri)
    import yaml

    space_text = path.read_text() + "\n# effective fixed settings (file + overrides)\n" + \
        yaml.safe_dump({"fixed": space.fixed}, sort_keys=False)
    return StudyPlan(o, space, space_text, study, storage, experiment_path, optuna_storage, uri, not o.resume)


def _ray_init(address: str | None) -> bool:
    """Connect to ``address`` or start a new local Ray; returns whether this call started it.

    Without ``--address`` the study always starts its own Ray (``address="local"``): a plain
    ``ray.init()`` would join whatever cluster Ray's current-cluster file names, a dead one included.
    Ray 2.60 turns token auth on for a new local cluster; ltstudy keeps it off unless the user set
    ``RAY_AUTH_MODE`` (documented in the README; cluster.yaml sets it explicitly).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address or "local", log_to_driver=False, logging_level="WARNING")
    return True


def _max_concurrent(o: StudyOptions) -> int:
    import ray

    if o.max_concurrent:
        return o.max_concurrent
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 1) // (o.workers * o.cpus_per_worker))
    if o.gpus_per_worker:
        fits = min(fits, int(total.get("GPU", 0) // (o.workers * o.gpus_per_worker)))
    return max(1, fits)


def _build_tuner(plan: StudyPlan, trainable: Any, callback: Any):
    import ray.tune
    from ray.tune import Tuner

    from ltstudy.study.callbacks import PlacementGroupReaper
    from ltstudy.study.search import make_scheduler, make_searcher

    o = plan.opts
    if not plan.fresh:
        tuner = Tuner.restore(plan.experiment_path, trainable, resume_unfinished=True,
                              resume_errored=False)
        # The pickled callback would carry the old process's settings; use this run's.
        tuner._local_tuner.get_run_config().callbacks = [callback, PlacementGroupReaper()]
        return tuner
    if "://" not in plan.optuna_storage:
        Path(plan.optuna_storage).parent.mkdir(parents=True, exist_ok=True)
    space = plan.space
    searcher = make_searcher(space, o.sampler, o.seed, plan.study, plan.optuna_storage, fresh=True)
    scheduler = make_scheduler(o.scheduler, space.metric, space.mode, space.max_epochs(),
                               o.grace_period, o.reduction_factor)
    return Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=o.num_trials, max_concurrent_trials=_max_concurrent(o)),
        run_config=ray.tune.RunConfig(
            name=plan.study, storage_path=plan.storage, callbacks=[callback, PlacementGroupReaper()],
            verbose=o.verbose,
            failure_config=ray.tune.FailureConfig(max_failures=o.retries),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def study_tags(plan: StudyPlan) -> dict[str, Any]:
    o, s = plan.opts, plan.space
    return {"ltstudy.method": s.method, "ltstudy.metric": s.metric, "ltstudy.mode": s.mode,
            "ltstudy.sampler": o.sampler, "ltstudy.scheduler": o.scheduler,
            "ltstudy.num_trials": o.num_trials, "ltstudy.workers": o.workers,
            "ltstudy.storage": plan.experiment_path, "ltstudy.tuned": ",".join(s.tuned_names),
            "dataset": s.fixed.get("dataset", "cifar10-lt"), "git_commit": git_commit(),
            **({"ltstudy.feature_key": s.fixed["feature_key"]} if s.fixed.get("feature_key") else {})}


def run_study(o: StudyOptions, echo: Callable[..., None] | None = None) -> StudySummary:
    """Plan, record, run (or resume) and summarise one study."""
    import optuna

    from ltstudy.methods import get_method
    from ltstudy.study.callbacks import MLflowTrialCallback
    from ltstudy.study.runner import Resources, make_trainable
    from ltstudy.study.search import open_optuna_storage
    from ltstudy.study.tracking import study_trials

    tic = time.time()
    plan = plan_study(o)
    if plan.fresh and "backbone" in plan.space.fixed and get_method(o.method).stage == "feature":
        plan.space = plan.space.with_overrides(_feature_pins(plan))
    tracker = StudyTracker(plan.tracking_uri, plan.study)
    parent = tracker.open(study_tags(plan), resume=o.resume)
    # Save Tune's experiment state at every controller step (default: throttled), so a driver killed
    # right after a trial finished does not resume that trial as unfinished and run it again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    started = _ray_init(o.address)
    try:
        callback = MLflowTrialCallback(plan.tracking_uri, tracker.experiment_id, parent, plan.study,
                                       git_commit(), echo)
        res = Resources(o.workers, o.cpus_per_worker, o.gpus_per_worker, o.retries, plan.storage)
        tuner = _build_tuner(plan, make_trainable(res), callback)
        tuner.fit()
    except BaseException:
        tracker.mlc.set_terminated(parent, "FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    try:
        ot_study = optuna.load_study(study_name=plan.study, storage=open_optuna_storage(plan.optuna_storage))
    except KeyError:  # no trial was ever asked for
        ot_study = None
    best = tracker.finish(plan.space_text, plan.space.metric, plan.space.mode, ot_study)
    trials = study_trials(tracker.mlc, tracker.experiment_id, parent)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    return StudySummary(plan.study, plan.space.metric, plan.space.mode, best, plan.space.tuned_names,
                        counts, plan.experiment_path, plan.tracking_uri, parent, time.time() - tic,
                        dict(callback.wall), trials)
