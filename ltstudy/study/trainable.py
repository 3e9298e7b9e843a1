"""The Tune trial: one worker runs ``run_trial`` in the trial's own process; more workers run it
through Ray Train's ``TorchTrainer`` (DDP), launched from the trial as Train V2 expects.

Every report carries ``epochs_total`` (so a stopped trial can be told from a finished one), the node id
(so a multi-node study can be checked) and ``time_in_run_trial_s`` (for the per-trial overhead bench).

Deterministic errors — a non-finite loss, a bad setting or dataset (``LtstudyError``), running out of GPU
memory — are properties of the configuration, not accidents: they are reported as a ``failure`` result
and the trial ends without raising, so Tune's and Train's retries (meant for lost workers and nodes) do
not re-run them. A trial restored from its final checkpoint (it finished, but the driver died before
Tune's state caught up) replays its final result instead of loading its data again.

Throughput: Tune reuses a one-worker trial's process for the next trial (:func:`reuse_actors`), so torch,
ltstudy and the decoded dataset (``config.load_data`` keeps it per process) are loaded once per process,
not per trial.
Checkpoints are written every ``checkpoint_every`` epochs, at the scheduler's rung epochs and at the end
(not after every epoch); a multi-worker trial uploads them in the background (Ray Train's ``ASYNC`` mode).
The first report of every trial carries when its process began importing ltstudy and finished importing
the trial code, when the trial function was entered and when its data and model were ready (``startup``),
from which the driver works out the start-up cost (:mod:`ltstudy.study.startup`).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint, CheckpointUploadMode
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from ltstudy import IMPORT_STARTED
from ltstudy.config import resolve_config
from ltstudy.errors import LtstudyError
from ltstudy.study.cluster.nodes import node_problem_here
from ltstudy.study.cluster.placement import PLACEMENT_GROUP_KEY
from ltstudy.study.search.schedulers import CHECKPOINTED_KEY
from ltstudy.study.search.space import OBJECTIVES
from ltstudy.train import NonFiniteLossError, TrialContext, finished_metrics, run_trial

#: failures that a retry would only repeat
DETERMINISTIC = (NonFiniteLossError, LtstudyError, torch.cuda.OutOfMemoryError)

#: the first report of a trial carries its start-up time stamps under this key (see callbacks.StartupCallback)
STARTUP_KEY = "startup"
#: how long a reused trial process waits for the previous trial's thread to end (see single_worker_trial)
REUSE_WAIT_S = 300


#: when this process began importing ltstudy and finished importing the trial code, and how many trials it
#: has run (Tune reuses trial processes)
_IMPORTS = {"import_started": IMPORT_STARTED, "imported": time.time()}
_TRIALS_RUN = 0


def _driver_stamps() -> dict[str, Any]:
    """A multi-worker trial's Train driver: its process's stamps. A module-level function, so that it runs
    with the trial process's globals (the trial function is a closure, which cloudpickle ships by value,
    together with the driver's copies of the globals it names)."""
    return {"driver_import_started": _IMPORTS["import_started"], "driver_entered": time.time(),
            "driver_trials": _next_trial()}


def _next_trial() -> int:
    """Counts this process's trials; returns how many it has run, this one included."""
    global _TRIALS_RUN
    _TRIALS_RUN += 1
    return _TRIALS_RUN


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Per-trial shape: workers, CPUs and (possibly fractional) GPUs per worker, Train retries; for
    multi-worker trials what the Train driver holds and the DDP backend (see ``study.cluster.placement``)."""

    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    retries: int = 1
    storage: str = ""
    driver: dict[str, float] = field(default_factory=lambda: {"cpu": 0.01})
    backend: str = ""  # default: nccl on GPUs, gloo on the CPU
    checkpoint_every: int  # epochs between trial checkpoints (the last epoch always has one)
    checkpoint_epochs: tuple[int, ...] = ()  # further epochs that get one: the scheduler's rungs
    node_check: dict[str, Any] | None = None  # what a trial checks on its node first (cluster.nodes)

    @classmethod
    def of(cls, o: Any, *, storage: str, placement: Any, checkpoint_epochs: tuple[int, ...] = ()) -> Resources:
        """The trial shape of study options ``o`` placed on a cluster (``cluster.placement.Placement``)."""
        return cls(workers=o.workers, cpus=o.cpus_per_worker, gpus=o.gpus_per_worker, retries=o.retries,
                   storage=storage, driver=placement.driver, backend=placement.backend,
                   checkpoint_every=o.checkpoint_every, checkpoint_epochs=checkpoint_epochs,
                   node_check=getattr(placement, "node_check", None))

    def context(self, **kw: Any) -> TrialContext:
        return TrialContext(checkpoint_every=self.checkpoint_every,
                            checkpoint_epochs=frozenset(self.checkpoint_epochs), **kw)

    def tune_resources(self) -> dict[str, float]:
        """What the Tune trial itself holds: the whole worker for one worker, the driver's share else."""
        if self.workers == 1:
            return {"cpu": self.cpus, "gpu": self.gpus}
        return dict(self.driver)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _failure_result(exc: Exception, cfg: Any) -> dict[str, Any]:
    """The last result of a failed trial. It carries every objective as NaN because Tune requires the
    scheduler's metric in each result; it has no ``epoch``, so ASHA does not record it, and the
    searcher and the MLflow callback recognise the ``failure`` key."""
    return {"failure": f"{type(exc).__name__}: {exc}", "epochs_total": cfg.train.epochs,
            "node_id": _node_id(), **{k: float("nan") for k in OBJECTIVES}}


def scratch_dir(prefix: str) -> str:
    """A new private folder for a trial's local checkpoints under ``$TMPDIR/ltstudy-scratch-UID``, named after
    this process. A trial removes its folders when it ends; a process killed with SIGKILL (an interrupted
    study, a preempted node) cannot, so every new folder first sweeps away those of processes that are gone
    (a few MB of checkpoint each, for ever, otherwise)."""
    root = os.path.join(tempfile.gettempdir(), f"ltstudy-scratch-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    for name in os.listdir(root):
        pid = name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{os.getpid()}-{prefix}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _local_copy(ckpt: Checkpoint | None) -> str | None:
    return ckpt.to_directory(scratch_dir("restore")) if ckpt is not None else None


def _reporter(cfg: Any, send: Any, ctx: TrialContext, checkpoints: bool = True, group: Any = None,
              origin: dict[str, Any] | None = None, upload: dict[str, Any] | None = None) -> Any:
    """The ``report`` callback of ``run_trial``: adds the keys the study needs, then ``send``s.

    ``origin``: start-up stamps of the process that launched this one (a multi-worker trial's driver);
    ``upload``: extra ``send`` arguments for a checkpoint, which then moves to a folder of its own first
    (Ray Train uploads it in the background while training goes on, and deletes it after).
    """
    started, entered = time.perf_counter(), time.time()
    trials = _next_trial()
    node = _node_id()
    last: list[float] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        now = time.time()
        metrics.update(epochs_total=cfg.train.epochs, node_id=node,
                       time_in_run_trial_s=time.perf_counter() - started,
                       epoch_wall_s=now - (last[-1] if last else (ctx.ready_at or entered)))
        if not last:
            metrics[STARTUP_KEY] = {**_IMPORTS, "entered": entered, "ready": ctx.ready_at,
                                    "process_trials": trials, **(origin or {})}
        last.append(now)
        if group is not None:
            metrics[PLACEMENT_GROUP_KEY] = group.id.hex()
        if not (checkpoint_dir and checkpoints):
            send(metrics, checkpoint=None, **(upload or {}))
            return
        metrics[CHECKPOINTED_KEY] = True  # the driver saves Tune's state with it (schedulers.SavesState)
        if upload:
            own = tempfile.mkdtemp(prefix="ltstudy-upload-")
            for name in os.listdir(checkpoint_dir):
                os.replace(os.path.join(checkpoint_dir, name), os.path.join(own, name))
            checkpoint_dir = own
        send(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir), **(upload or {}))

    return report


def _release() -> None:
    """After a trial, in a process the next trial may reuse: the trial's garbage collected, and cached GPU
    memory given back to the GPU's other tenants (several trials can share one GPU).

    A full collection walks every object of the process: torch's, Ray's and MLflow's modules make that 0.27 s
    on a 2-core machine, more than half of what a reused process spent between two one-second trials. After
    the process's first trial, what is still alive (the imports, the cached dataset) is frozen
    (``gc.freeze``): later collections walk only what later trials made. Frozen objects are still freed by
    reference counting; only a reference cycle among them would stay."""
    gc.collect()
    if not gc.get_freeze_count():
        gc.freeze()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_or_replay(cfg: Any, report: Any, ctx: TrialContext) -> None:
    """Train, or report the final result again when the checkpoint already holds the last epoch."""
    done = finished_metrics(ctx.resume_from, cfg) if ctx.resume_from else None
    if done is not None:
        report(done, None)
    else:
        run_trial(cfg, report, ctx)


def _train_here(cfg: Any, report: Any, ctx: TrialContext, send: Any) -> None:
    """Train (or replay) in this process; a deterministic failure is ``send``-reported as the trial's
    result; the trial's local checkpoint folders are removed after."""
    try:
        _run_or_replay(cfg, report, ctx)
    except DETERMINISTIC as exc:
        send(_failure_result(exc, cfg))
    finally:
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
        if ctx.resume_from:
            shutil.rmtree(ctx.resume_from, ignore_errors=True)


def make_single_worker_trial(res: Resources):
    """One-worker trial: train in the trial's process, report each epoch to Tune."""

    def single_worker_trial(config: dict[str, Any]) -> None:
        # Tune hands this process the next trial once this trial's thread has ended (after its last
        # report: clean-up, a stopped trial's exit); it gives up after TUNE_FUNCTION_THREAD_TIMEOUT_S
        # (default 2 s, read in this process) and then fails the next trial. On a loaded machine the
        # clean-up alone can take longer, so wait as long as a thread that is ending can need.
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(REUSE_WAIT_S))
        cfg = resolve_config(dict(config))
        problem = node_problem_here(res.node_check)  # a node that cannot run it: fail now, naming it
        if problem:
            ray.tune.report(_failure_result(RuntimeError(problem), cfg))
            return
        work = scratch_dir("ckpt")
        resume = _local_copy(ray.tune.get_checkpoint())
        ctx = res.context(checkpoint_dir=work, resume_from=resume)
        try:
            _train_here(cfg, _reporter(cfg, ray.tune.report, ctx), ctx, ray.tune.report)
        finally:
            _release()

    return single_worker_trial


def train_worker(loop: dict[str, Any]) -> None:
    """Runs on every DDP rank; rank 0 writes checkpoints, every rank reports (a collective)."""
    cfg = resolve_config(dict(loop["config"]))
    problem = node_problem_here(loop.get("node_check"))  # every rank's node, the autoscaler's late ones too
    if problem:
        raise RuntimeError(problem)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    work = scratch_dir(f"ckpt-r{rank}")
    resume = _local_copy(ray.train.get_checkpoint())
    # an explicit device=cpu wins over the GPU Train assigned (logical GPUs on CPU-only test clusters)
    device = "cpu" if cfg.train.device == "cpu" else ray.train.torch.get_device()
    tctx = TrialContext(device=device, rank=rank, world_size=world, checkpoint_dir=work, resume_from=resume,
                        checkpoint_every=loop.get("checkpoint_every", 1),
                        checkpoint_epochs=frozenset(loop.get("checkpoint_epochs", ())))
    # rank 0 also names the workers' placement group, for PlacementGroupReaper
    report = _reporter(cfg, ray.train.report, tctx, checkpoints=rank == 0,
                       group=ray.util.get_current_placement_group(), origin=loop.get("origin"),
                       upload={"checkpoint_upload_mode": CheckpointUploadMode.ASYNC})
    _train_here(cfg, report, tctx, ray.train.report)


def make_multi_worker_trial(res: Resources):
    """The Tune trial as a Train driver: a deterministic run name makes a restarted trial resume."""

    def multi_worker_trial(config: dict[str, Any]) -> None:
        trial_id = ray.tune.get_context().get_trial_id()
        origin = _driver_stamps()
        per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {})}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": dict(config), "origin": origin,
                               "checkpoint_every": res.checkpoint_every, "node_check": res.node_check,
                               "checkpoint_epochs": list(res.checkpoint_epochs)},
            torch_config=TorchConfig(backend=res.backend or ("nccl" if res.gpus else "gloo")),
            scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus > 0,
                                                   resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=f"train-{trial_id}", storage_path=res.storage, callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=res.retries),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        try:
            trainer.fit()
        finally:
            _release()

    return multi_worker_trial


def reuse_actors(workers: int) -> bool:
    """Whether Tune runs the next trial in a finished trial's actor: for one-worker trials, which train in
    that process. A multi-worker trial's actor only drives Ray Train, whose workers are new for every trial
    anyway; and a trial that ASHA stops is ended by resetting its actor, which cannot stop a ``fit()`` of
    Ray Train still running in it (the next trial then waits behind it)."""
    return workers == 1


def make_trainable(res: Resources):
    """The function Tune runs per trial, with the resources it must hold."""
    fn = make_single_worker_trial(res) if res.workers == 1 else make_multi_worker_trial(res)
    return ray.tune.with_resources(fn, res.tune_resources())
