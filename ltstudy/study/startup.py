"""What a trial pays before its first training step, stage by stage.

The driver notes when Tune launches a trial; the trial's first report carries when its process was
created, when the trial function was entered and when its data and model were ready (see
:data:`ltstudy.study.trainable.STARTUP_KEY`); a multi-worker trial also carries its Train driver's stamps.
:class:`~ltstudy.study.callbacks.StartupCallback` turns those into seconds per stage, adds them to the result (so MLflow records
them as ``startup_*`` metrics and the progress lines can warn), and :func:`startup_note` says in one line
whether several workers per trial pay for their start-up. Wall clocks of different nodes are compared,
so on a multi-node cluster the figures are as good as the nodes' clock sync (NTP: milliseconds).
"""

from __future__ import annotations

from typing import Any

#: the stages of a one-worker and of a multi-worker trial, in order: (short name, what they hold)
STAGES = {
    "startup_import_s": ("imports", "a new trial process importing torch and ltstudy (0 in a reused one)"),
    "startup_ray_s": ("Ray", "Ray's scheduling and the trial actor's set-up"),
    "startup_driver_s": ("Train driver", "the Train driver's actor: scheduling, imports, set-up"),
    "startup_workers_s": ("worker processes", "Ray Train's controller, placement group and worker actors"),
    "startup_worker_import_s": ("worker imports", "the workers importing torch and ltstudy"),
    "startup_worker_setup_s": ("process group", "Ray Train's worker set-up and the DDP process group"),
    "startup_data_model_s": ("data + model", "the dataset and the network"),
}


def _origin(launch: float, import_started: float | None, trials: int) -> float:
    """When a trial's own work began: its launch, or earlier when Tune created a new process for it
    before telling the callbacks (the process's imports happen then)."""
    if trials == 1 and import_started is not None:
        return min(launch, import_started)
    return launch


def startup_stages(launch: float, stamps: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage from the trial's launch to its first training step (see :data:`STAGES`).

    ``launch`` is the driver's wall time at Tune's ``on_trial_start``; stamps are the trial's (runner).
    """
    entered = stamps["entered"]
    ready = stamps.get("ready") or entered
    out: dict[str, float] = {}
    if stamps.get("driver_entered") is not None:  # a multi-worker trial: Tune's actor drives Ray Train
        start = _origin(launch, stamps.get("driver_import_started"), stamps.get("driver_trials", 1))
        driver = max(stamps["driver_entered"], start)
        worker_start = min(max(stamps.get("import_started") or driver, driver), entered)
        imported = min(max(stamps.get("imported") or worker_start, worker_start), entered)
        out["startup_driver_s"] = driver - start
        out["startup_workers_s"] = worker_start - driver
        out["startup_worker_import_s"] = imported - worker_start
        out["startup_worker_setup_s"] = entered - imported
    else:
        fresh = stamps.get("process_trials", 1) == 1
        start = _origin(launch, stamps.get("import_started"), stamps.get("process_trials", 1))
        imports = (stamps["imported"] - stamps["import_started"]) if fresh and stamps.get("imported") else 0.0
        out["startup_import_s"] = max(0.0, min(imports, entered - start))
        out["startup_ray_s"] = max(0.0, entered - start - out["startup_import_s"])
    out["startup_data_model_s"] = ready - entered
    out["startup_s"] = ready - start
    out["reused_process"] = float(stamps.get("driver_trials", stamps.get("process_trials", 1)) > 1)
    return out


def startup_note(label: str, workers: int, result: dict[str, Any]) -> tuple[str, str | None]:
    """(one line on a multi-worker trial's start-up, a warning when an epoch is shorter than it)."""
    startup, epoch = result["startup_s"], result.get("epoch_wall_s")
    parts = ", ".join(f"{STAGES[k][0]} {result[k]:.1f} s" for k in STAGES if k in result)
    line = (f"{label}: {workers} workers ready {startup:.1f} s after launch ({parts})"
            + (f"; first epoch {epoch:.1f} s" if epoch is not None else ""))
    warning = None
    if epoch is not None and epoch < startup:
        warning = (f"each trial spends {startup:.0f} s starting its {workers} workers, more than an epoch "
                   f"({epoch:.1f} s): unless trials run many epochs, --workers 1 with more concurrent "
                   "trials gets more done")
    return line, warning
