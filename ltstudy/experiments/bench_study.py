"""``ltstudy bench study``: what a study costs the user, on this machine.

Each configuration is a real ``ltstudy tune`` run in a fresh process (``python -m ltstudy.cli tune``), so the
wall time is what a user pays: from the command's start to its exit, Ray's start and shutdown, every
trial's process start, data loading, checkpoints and MLflow records included. From the study's MLflow
record it then reads each trial's time inside ``run_trial`` and its start-up stages
(:mod:`ltstudy.study.startup`), and reports

* **machine share used** = Σ (time inside ``run_trial`` × workers per trial) ÷ (slots × wall), where
  slots is what the study can run at once (concurrent trials × workers per trial): 1.0 means every slot
  trained from the command's first instant to its last;
* trials per hour = trials × 3600 ÷ wall;
* the medians of the start-up stages of a trial, and how many trials ran in a reused process.

With ``gpu=True`` it packs N = 1, 2, 4, 8 trials onto each GPU (``--gpus-per-worker 1/N``) and reports the
aggregate training throughput (every trial's training images ÷ wall) and trials per hour per GPU.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ltstudy.errors import ConfigError, LtstudyError, StudyFailed
from ltstudy.study.startup import STAGES

#: what the issue's baseline ran: 8 trials of 2 epochs, no early stopping, CE on CIFAR-10-LT at IF 100
DEFAULT_TRIALS, DEFAULT_EPOCHS = 8, 2


def tune_process(root: Path, name: str, flags: list[str]) -> float:
    """One ``ltstudy tune`` process of study ``name`` under ``root`` (its storage and MLflow store there);
    returns its wall seconds, from the process's start to its exit (a failed study raises)."""
    argv = [sys.executable, "-m", "ltstudy.cli", "tune", "--study-name", name, "--storage", str(root / "storage"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", *flags]
    tic = time.perf_counter()
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise StudyFailed(f"bench: `ltstudy tune` ({name}) exited {done.returncode}: {tail[0]}")
    return wall


def _tune(tmp: Path, name: str, trials: int, concurrent: int, workers: int, cpus: float, gpus: float,
          overrides: list[str]) -> float:
    """One ``ltstudy tune`` process of the bench's CE study; returns its wall seconds."""
    return tune_process(tmp, name, [
        "--method", "ce", "--num-trials", str(trials), "--max-concurrent", str(concurrent), "--scheduler", "none",
        "--sampler", "random", "--seed", "0", "--retries", "0", "--workers", str(workers),
        "--cpus-per-worker", f"{cpus:g}", "--gpus-per-worker", f"{gpus:g}", *overrides])


def trial_records(tmp: Path, name: str) -> list[dict[str, Any]]:
    """Per trial: seconds inside run_trial, training images, its start-up stages (first report)."""
    from ltstudy.study.tracking.records import find_study, study_trials

    mlc, exp, parent = find_study(f"sqlite:///{tmp / 'mlflow.db'}", name)
    out = []
    for t in study_trials(mlc, exp.experiment_id, parent.info.run_id):
        history = {k: mlc.get_metric_history(t["run_id"], k)
                   for k in ("train_images_per_s", "epoch_seconds", *STAGES, "startup_s", "reused_process")}
        speed = {m.step: m.value for m in history["train_images_per_s"]}
        seconds = {m.step: m.value for m in history["epoch_seconds"]}
        out.append({"status": t["status"], "in_trial_s": t["metrics"].get("time_in_run_trial_s", 0.0),
                    "images": sum(speed[s] * seconds.get(s, 0.0) for s in speed),
                    **{k: h[0].value for k, h in history.items() if h and k not in ("train_images_per_s",
                                                                                   "epoch_seconds")}})
    return out


def _row(label: str, trials: list[dict[str, Any]], wall: float, slots: int, workers: int) -> dict[str, Any]:
    inside = sum(t["in_trial_s"] for t in trials) * workers
    startup = {k: statistics.median(t[k] for t in trials if k in t) for k in (*STAGES, "startup_s")
               if any(k in t for t in trials)}
    return {"config": label, "workers": workers, "slots": slots, "trials": len(trials),
            "completed": sum(t["status"] == "completed" for t in trials), "wall_s": wall,
            "in_trial_s": inside, "share": inside / (slots * wall), "trials_per_hour": 3600 * len(trials) / wall,
            "images_per_s": sum(t["images"] for t in trials) / wall,
            "reused": int(sum(t.get("reused_process", 0.0) for t in trials)), "startup": startup}


def bench_study(trials: int = DEFAULT_TRIALS, epochs: int = DEFAULT_EPOCHS, workers: tuple[int, ...] = (1, 2),
                cpus: int | None = None, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """A study of ``trials`` x ``epochs`` per worker count, filling ``cpus`` cores (default: all)."""
    cpus = cpus or os.cpu_count() or 1
    rows = []
    for w in workers:
        if w > cpus:
            raise ConfigError(f"bench study: {w} workers per trial need {w} CPUs; this machine has {cpus}")
        concurrent = cpus // w
        # one worker: the trial's process is the worker; several: the Train driver holds 0.01 CPU
        per_worker = 1.0 if w == 1 else (cpus - 0.01 * concurrent) / (concurrent * w)
        with tempfile.TemporaryDirectory(prefix="ltstudy-bench-") as tmp:
            name = f"bench-{w}w"
            wall = _tune(Path(tmp), name, trials, concurrent, w, per_worker, 0,
                         [*(overrides or []), f"epochs={epochs}"])
            rows.append(_row(f"{w} worker{'s' if w > 1 else ''} x {concurrent} concurrent",
                             trial_records(Path(tmp), name), wall, concurrent * w, w))
    return rows


def bench_gpu_packing(per_gpu: tuple[int, ...] = (1, 2, 4, 8), epochs: int = DEFAULT_EPOCHS,
                      overrides: list[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """N trials per GPU for each N: aggregate training img/s and trials/hour per GPU, and a recommendation
    (the N with the most trials per hour, unless a larger N failed)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ConfigError("bench study --gpu: no CUDA GPU on this machine")
    cpus = os.cpu_count() or 1
    rows = []
    for n in per_gpu:
        concurrent = n * gpus
        with tempfile.TemporaryDirectory(prefix="ltstudy-bench-") as tmp:
            name = f"bench-gpu-{n}"
            try:
                wall = _tune(Path(tmp), name, 2 * concurrent, concurrent, 1, max(cpus // concurrent, 1) * 1.0,
                             1.0 / n, [*(overrides or []), f"epochs={epochs}", "device=cuda"])
            except LtstudyError as exc:
                rows.append({"config": f"{n} per GPU", "per_gpu": n, "error": str(exc)})
                break
            row = _row(f"{n} per GPU", trial_records(Path(tmp), name), wall, concurrent, 1)
            rows.append({**row, "per_gpu": n, "trials_per_hour_per_gpu": row["trials_per_hour"] / gpus})
    done = [r for r in rows if "error" not in r]
    if not done:
        return rows, "no packing ran; see the error"
    best = max(done, key=lambda r: r["trials_per_hour_per_gpu"])
    gain = best["images_per_s"] / done[0]["images_per_s"]
    return rows, (f"--gpus-per-worker {1 / best['per_gpu']:g} ({best['per_gpu']} trials per GPU): "
                  f"{best['trials_per_hour_per_gpu']:.0f} trials/hour per GPU, {gain:.1f}x the aggregate "
                  "training throughput of one trial per GPU")
