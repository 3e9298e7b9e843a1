"""The study's process while Tune runs: who owns SIGINT/SIGTERM, the environment Tune reads, and which logs
a person sees (ltstudy's own lines below ``-v``; never Ray's hints that point past ltstudy)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import optuna


@contextlib.contextmanager
def interrupts() -> Iterator[SimpleNamespace]:
    """Own SIGINT/SIGTERM: the first asks Tune to stop gracefully (SIGUSR1), a second one stops at once."""
    caught = SimpleNamespace(signal=None)
    if signal.getsignal(signal.SIGINT) is None or threading.current_thread() is not threading.main_thread():
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
    with env({"TUNE_DISABLE_SIGINT_HANDLER": "1"}):
        try:
            yield caught
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def env(values: dict[str, str]):
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


def _drop_ray_hints(record: logging.LogRecord) -> bool:
    """Ray's hints after an interrupted loop (``Tuner.restore(...)``, "Trials did not complete") point past
    ltstudy: the study prints its own ``--resume`` command."""
    text = str(record.msg)
    return not text.startswith(("Experiment has been interrupted", "Training has been interrupted",
                                "Trials did not complete", "Stop signal received"))


def quiet(verbose: int) -> None:
    """Below ``-v`` the study's own lines are the output: no MLflow/Optuna INFO logs or Optuna warnings; never
    Ray's own resume hints."""
    tune_log = logging.getLogger("ray.tune.tune")
    if _drop_ray_hints not in tune_log.filters:
        tune_log.addFilter(_drop_ray_hints)
    if verbose > 0:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def quiet_tuner_output(verbose: int) -> contextlib.AbstractContextManager:
    """Around ``Tuner.fit``: Ray's new output engine prints its experiment header even at verbose 0 (its
    legacy engine prints nothing at 0); and Tune's warning about frequent experiment-state saves is off, as
    the study saves the state on purpose whenever a trial is added or checkpoints (``schedulers.SavesState``).
    Tune's own per-trial loggers (``result.json``, ``progress.csv``, TensorBoard events) are off: MLflow holds
    every result, nothing reads those files, and the TensorBoard one warned at every trial end about the
    calibration bins' empty entries. The checkpoints Tune keeps per trial carry no copy of their result
    (``TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE``, with no score attribute set): nothing reads those
    copies, and they were a third of every trial's share of the experiment state written at each save."""
    # without those files, the ResultGrid Tune builds at the end (which ltstudy does not use) warns per trial
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    always = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
              "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_ONLY_STORE_CHECKPOINT_SCORE_ATTRIBUTE": "1"}
    return env({**always, "RAY_AIR_NEW_OUTPUT": "0"} if verbose == 0 else always)
