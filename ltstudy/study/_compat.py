"""Every place ltstudy touches a private part of Ray or Optuna, and the pickled classes a saved study names.

Ray and Optuna change their internals between releases without notice; a study that reached into them from
five modules broke one place at a time, silently. Here each touch is one small function with the version it
was written against, and ``tests/study/test_compat.py`` exercises each one on the installed versions, so an
upgrade that removes or renames a private fails one named test instead of a study in the middle of a run.
This module imports nothing from the rest of ``ltstudy.study``: every sub-package may import it. Each
function imports the private it touches, so a private that is gone fails that call, not ``import ltstudy``.

Written against Ray 2.60 and Optuna 5.0/5.1 (``pyproject.toml`` pins those ranges).
"""

from __future__ import annotations

from typing import Any

#: Classes that Tune pickles with a study (``tuner.pkl``, ``searcher-state-*.pkl``, the experiment state)
#: and ``ltstudy tune --resume`` unpickles by module path: moving or renaming one makes every saved study
#: unresumable. Part of the on-disk contract; ``tests/study/test_compat.py`` imports each path, and the
#: resume tests restore a saved study in a new process.
PICKLED = (
    "ltstudy.study.search.searcher.LtOptunaSearch",
    "ltstudy.study.search.halving.HalvingSearch",
    "ltstudy.study.search.halving.Budget",
    "ltstudy.study.search.space.DefineByRun",
    "ltstudy.study.search.space.Param",
    "ltstudy.study.search.concurrency.StudyConcurrency",
    "ltstudy.study.search.schedulers.StudyASHA",
    "ltstudy.study.search.schedulers.StudyFIFO",
    "ltstudy.study.search.budget.TimeBudget",
    "ltstudy.study.search.budget.BudgetEnd",
    "ltstudy.study.search.budget.BudgetStopper",
    "ltstudy.study.tracking.callback.MLflowTrialCallback",
    "ltstudy.study.cluster.placement.PlacementGroupReaper",
    "ltstudy.study.callbacks.ProgressCallback",
    "ltstudy.study.callbacks.StartupCallback",
    "ltstudy.study.search.optuna_storage.PrivateRDBStorage",
)


# ------------------------------------------------------------------------------------ Ray's OptunaSearch
def optuna_trials(searcher: Any) -> dict[str, Any]:
    """Tune trial id -> the ``optuna.Trial`` OptunaSearch asked for it (``OptunaSearch._ot_trials``; an
    :class:`~ltstudy.study.search.searcher.LtOptunaSearch` drops a trial once told)."""
    return searcher._ot_trials


def completed_trials(searcher: Any) -> set[str]:
    """The Tune trial ids OptunaSearch has already told Optuna about (``_completed_trials``)."""
    return searcher._completed_trials


def enqueued_points(searcher: Any) -> list[dict[str, Any]] | None:
    """The ``points_to_evaluate`` OptunaSearch was built with (``_points_to_evaluate``)."""
    return searcher._points_to_evaluate


def searcher_study(searcher: Any) -> Any:
    """The ``optuna.Study`` behind OptunaSearch (``_ot_study``)."""
    return searcher._ot_study


# ----------------------------------------------------------------------------------------------- Optuna
def storage_trial_id(trial: Any) -> int:
    """The storage's id of an Optuna trial (``Trial._trial_id`` / ``FrozenTrial._trial_id``): what the
    storage's per-trial calls take, unlike the trial's number."""
    return trial._trial_id


def trial_finished(study: Any, trial: Any) -> bool:
    """Whether the storage already holds an end for ``trial`` (another writer may have told it):
    ``Study._storage.get_trial(...)``, one row read instead of every trial of the study."""
    return study._storage.get_trial(storage_trial_id(trial)).state.is_finished()


# ------------------------------------------------------------------------------------------- Ray Tune
def tuner_run_config(tuner: Any) -> Any:
    """The ``RunConfig`` a (restored) ``Tuner`` will run with (``Tuner._local_tuner``): a restored tuner
    carries the callbacks pickled by the process that started the study."""
    return tuner._local_tuner.get_run_config()


def tuner_search_alg(tuner: Any) -> Any:
    """The search algorithm of a (restored) ``Tuner`` (``TunerInternal._tune_config``)."""
    return tuner._local_tuner._tune_config.search_alg


def force_experiment_save(tune_controller: Any) -> None:
    """Make the controller save its experiment state (trials, searcher, callbacks) at the end of this step,
    whatever its saving period (``TuneController._checkpoint_manager._should_force_sync_up``, the flag Tune
    itself sets every ``num_to_keep`` trial checkpoints). ``tune_controller`` is what a scheduler's hooks get
    (a ``TrialRunnerWrapper`` around the controller) or the controller."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller._checkpoint_manager._should_force_sync_up = True


def drop_missing_checkpoints(trial: Any) -> list[str]:
    """Forget the checkpoints of a restored ``trial`` whose folders are gone; returns their paths.

    The experiment state a killed driver left can be a step or two behind the storage: Tune registers a
    trial's new checkpoint, deletes the oldest of the ``num_to_keep`` it keeps, and saves the state only
    later. Restored from such a state, the trial's checkpoint manager still lists the deleted folder; at
    the trial's next checkpoint Tune deletes it again, and ``_delete_fs_path`` raises for a missing path
    (logged as "Error handling checkpoint", and the new checkpoint is left out of the next save). Where
    even the latest listed checkpoint is gone, the trial restarts from the newest one left, or from its
    first epoch. Private: ``Trial.run_metadata.checkpoint_manager`` with its ``_checkpoint_results`` and
    ``_latest_checkpoint_result`` (and the metadata's cached JSON, ``invalidate_cache``)."""
    manager = trial.run_metadata.checkpoint_manager
    listed = list(manager._checkpoint_results)
    latest = manager._latest_checkpoint_result
    if latest is not None and latest not in listed:
        listed.append(latest)

    def gone(result: Any) -> bool:
        import pyarrow.fs

        ckpt = result.checkpoint
        return ckpt.filesystem.get_file_info(ckpt.path).type == pyarrow.fs.FileType.NotFound

    missing = [r for r in listed if gone(r)]
    if missing:
        manager._checkpoint_results = [r for r in manager._checkpoint_results if r not in missing]
        if latest in missing:
            manager._latest_checkpoint_result = manager._checkpoint_results[-1] if manager._checkpoint_results \
                else None
        trial.run_metadata.invalidate_cache()
    return [r.checkpoint.path for r in missing]


def slim_latest_checkpoint(trial: Any, metrics: dict[str, Any]) -> None:
    """Make ``metrics`` the copy of the result a trial's latest checkpoint carries (Tune writes it for every
    trial at every experiment save; on a restore it becomes the trial's last result). Tune keeps the whole
    result there even with ``TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE`` (set before the trimming). Private:
    ``checkpoint_manager._latest_checkpoint_result``, and the metadata's cached JSON."""
    latest = trial.run_metadata.checkpoint_manager._latest_checkpoint_result
    if latest is not None and latest.metrics is not metrics:
        latest.metrics = metrics
        trial.run_metadata.invalidate_cache()


def save_experiment_now(tune_controller: Any, trial: Any) -> None:
    """Save the experiment state now, ``trial`` included, and wait until it is on the storage: a scheduler's
    ``on_trial_add`` runs after the controller appended the trial and before it marked the trial for the
    next save (``TuneController._mark_trial_to_checkpoint``, then ``checkpoint(force=True, wait=True)``)."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    controller._mark_trial_to_checkpoint(trial)
    controller.checkpoint(force=True, wait=True)


def asha_rungs(scheduler: Any) -> list[list[tuple[float, dict[str, float]]]]:
    """ASHA's rungs per bracket, latest milestone first (``_brackets[i]._rungs``), as plain copies."""
    return [[(m, dict(rec)) for m, rec in bracket._rungs] for bracket in scheduler._brackets]


def set_asha_rungs(scheduler: Any, rungs: list[list[tuple[float, dict[str, float]]]]) -> None:
    for bracket, saved in zip(scheduler._brackets, rungs, strict=True):
        bracket._rungs = [(m, dict(rec)) for m, rec in saved]


def asha_stopped(scheduler: Any) -> int:
    """How many trials ASHA has stopped (``_num_stopped``, what its ``debug_string`` reports)."""
    return scheduler._num_stopped


def set_asha_stopped(scheduler: Any, value: int) -> None:
    scheduler._num_stopped = value


def asha_budget(scheduler: Any) -> tuple[str, float]:
    """(``time_attr``, ``max_t``) of an ASHA scheduler (``_time_attr``, ``_max_t``)."""
    return scheduler._time_attr, scheduler._max_t


# -------------------------------------------------------------------------------------- Ray's runtime
def gcs_cluster_config() -> Any:
    """The cluster config an autoscaler (v2, KubeRay) publishes in the GCS, or None
    (``ray._private.state.state.get_cluster_config``; Ray Train sizes itself from the same)."""
    from ray._private import state

    return state.state.get_cluster_config()


def autoscaler_status() -> bytes | None:
    """The v1 autoscaler's debug status (JSON with ``monitor_pid``) from the GCS key-value store
    (``ray.experimental.internal_kv._internal_kv_get`` of ``ray_constants.DEBUG_AUTOSCALING_STATUS``)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)


def check_trial_storage() -> str | None:
    """In a Tune trial: check that this node sees the storage marker Tune wrote; returns None, or the
    storage path when the marker is not visible from here. Outside a trial, None. (Tune checks it only when
    the first checkpoint uploads: ``ray.train._internal.session.get_session().storage._check_validation_file``.)
    """
    from ray.train._internal.session import get_session

    storage = getattr(get_session(), "storage", None)
    if storage is None:
        return None
    check = getattr(storage, "_check_validation_file", None)
    if check is None:  # another Ray: nothing to check with (the compat test says so)
        return None
    try:
        check()
    except Exception:  # noqa: BLE001 - Ray's RuntimeError: the marker is not visible from here
        return str(getattr(storage, "storage_fs_path", "the study's storage"))
    return None


def placement_group(hex_id: str) -> Any:
    """A ``PlacementGroup`` handle from the hex id a worker reported (``ray._raylet.PlacementGroupID``)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id)))


def prepare_and_validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does to a cluster-launcher file before anything starts: fill in the provider's
    defaults, then check it against Ray's schema (``ray.autoscaler._private.util``); returns the prepared
    config, raises on a refused one."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def bootstrap_aws(config: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does to a prepared AWS cluster config before it launches the head: IAM role, key pair,
    subnets, security groups and AMI filled in, created where missing
    (``ray.autoscaler._private.aws.config.bootstrap_aws``)."""
    from ray.autoscaler._private.aws.config import bootstrap_aws as bootstrap

    return bootstrap(config)


def start_worker_node(gcs_address: str, resources: dict[str, float], object_store_bytes: int) -> Any:
    """Start a Ray worker node in this process bound to 127.0.0.1 (what Ray's fake multi-node provider
    does; ``ray start --address`` refuses to join a loopback-only head): ``ray._private.node.Node``."""
    import ray._private.node
    import ray._private.parameter

    resources = dict(resources)
    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, redis_address=gcs_address, node_ip_address="127.0.0.1", min_worker_port=0,
        max_worker_port=0, dashboard_agent_listen_port=0, num_cpus=resources.pop("CPU", 0),
        num_gpus=resources.pop("GPU", 0), object_store_memory=object_store_bytes, resources=resources)
    return ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)


# ------------------------------------------------------------------------------ Ray's token authentication
def use_token_auth() -> None:
    """Token mode for this process and the ones it starts: ``RAY_AUTH_MODE=token`` and Ray's cached config
    and token refreshed (``authentication_token_setup._enable_token_auth`` and
    ``AuthenticationTokenLoader.reset_cache``, what Ray's own auth test helpers do after changing the
    token's source)."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    _enable_token_auth()
    AuthenticationTokenLoader.instance().reset_cache()


def has_auth_token() -> bool:
    """Whether Ray finds a token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``):
    ``AuthenticationTokenLoader.has_token(ignore_auth_mode=True)``."""
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def stop_autoscaler_monitor() -> None:
    """End the autoscaler monitor of the Ray node this process started, if it runs one
    (``ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]``).

    ``ray.shutdown`` stops the raylet and the GCS first, then sends the monitor SIGTERM; the monitor's
    handler reports its end to the GCS that is already gone and does not exit, so Ray waits its one second
    before SIGKILL (Ray 2.60, measured: 1.01 s of a 1.4 s shutdown). A local Ray's monitor has no workers to
    take down, so it gets SIGKILL here, before Ray's turn. A driver that joined a cluster owns no processes:
    nothing happens."""
    from ray._private import ray_constants, worker

    node = worker._global_node
    for info in (node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)


def bind_to_loopback() -> None:
    """A new local Ray on 127.0.0.1 only: every server of the node (GCS, raylet, object manager, agents)
    then listens on the loopback address instead of all interfaces. Ray does this itself on macOS and
    Windows (``ray_constants.ENABLE_RAY_CLUSTER``, read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when Ray
    is imported); the environment variable carries it to the processes Ray starts."""
    import os

    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
