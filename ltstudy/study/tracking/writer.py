"""MLflow writes off the Tune controller thread: one daemon thread writes a study's trial records in order.

:class:`ltstudy.study.tracking.callback.MLflowTrialCallback` hands every record of a trial to a :class:`RunWriter`
and returns at once. The writer finds or creates the trial's run itself (the callback passes how, see
:meth:`RunWriter.open`), then writes the records of each run in the order they came; per-step records
(an epoch's metrics and tags) that are queued together are coalesced into as few ``log_batch`` calls as
MLflow's limits allow. Nothing waits on purpose: records are written as soon as the thread gets to them, so
they are usually on the server long before anyone asks.

Durability. Records live in memory until written, so the callback *flushes* (:meth:`RunWriter.flush`: waits
until a run's records are written) wherever losing them would be permanent: when Tune saves the experiment
state that ``--resume`` restarts from (a resumed trial restarts after the checkpoint it names and never
reports the epochs before it again) and when a trial ends (Tune will not run it again); the study flushes
everything when it ends (:meth:`RunWriter.close`) and, for a process that never called ``close``, at
interpreter exit.

Failures. A write that fails because the store is out of reach (connection errors, HTTP 5xx, a locked
SQLite file) is retried with exponential backoff, in order: later records of that run wait behind it and
nothing is dropped. A write the store rejects (an invalid value) is not retried; it is counted. A flush
stops waiting once the writer has finished nothing for :data:`STALL_S` seconds (the store is down, not
slow), so an outage cannot hang a study; its records stay queued and are retried. :meth:`RunWriter.close`
raises :class:`~ltstudy.errors.TrackingWriteError` (exit code 1) naming how many records were not written
and why: a study never ends quietly with records missing.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException

from ltstudy.errors import TrackingWriteError
from ltstudy.study.tracking.store import client, log_batch

logger = logging.getLogger(__name__)

#: a flush gives up when the writer has finished no record for this long. A healthy store takes a record
#: in milliseconds (a per-class plot upload in about a second); a minute without one means the store is
#: down, and waiting longer would only hold Tune's controller thread (every running trial) hostage. It also
#: bounds the final flush: the queue at the end is short (everything was flushed at trial ends), so it
#: drains in seconds or the store is gone, and the command then exits with TrackingWriteError.
STALL_S = 60.0
#: first and longest pause between retries of a write that failed because the store was out of reach
BACKOFF_S = (0.5, 15.0)
#: MLflow error codes of a store that may answer later; any other MlflowException is a rejected record
TRANSIENT_CODES = frozenset({
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "IO_ERROR", "SERVICE_UNDER_MAINTENANCE",
    "WORKSPACE_TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "REQUEST_LIMIT_EXCEEDED",
    "RESOURCE_EXHAUSTED", "COULD_NOT_ACQUIRE_LOCK", "UNPARSEABLE_HTTP_ERROR"})


@dataclass
class OpenRun:
    """A run the writer writes to: found or created by the ``open`` function of its key."""

    run_id: str
    ended: bool = False  # it ended before a restore: nothing more is written to it
    logged: int = 0  # the last step written: a record of a step at or below it is a replay, and dropped


@dataclass(eq=False)
class _Op:
    key: str
    kind: str  # "open" | "log" | "call"
    what: str  # for messages: "the run", "epoch 3", "end of trial"
    fn: Callable[..., Any] | None = None
    step: int = 0
    metrics: list[Any] = field(default_factory=list)
    tags: dict[str, Any] = field(default_factory=dict)


def transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed later (the store was out of reach) rather than being rejected."""
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    return isinstance(exc, OSError)  # connection refused or reset, timeouts (requests' errors are OSErrors)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class RunWriter:
    """Writes the records of many runs, each identified by a key (a Tune trial id), on one daemon thread.

    ``client_factory(uri)`` makes the thread's MLflow client (tests pass one that counts or fails calls).
    """

    def __init__(self, uri: str, stall_s: float = STALL_S, backoff_s: tuple[float, float] = BACKOFF_S,
                 client_factory: Callable[[str], Any] = client) -> None:
        self.uri, self.stall_s, self.backoff_s, self.client_factory = uri, stall_s, backoff_s, client_factory
        self._cond = threading.Condition()
        self._queue: list[_Op] = []
        self._submitted: dict[str, int] = {}
        self._finished: dict[str, int] = {}  # written, dropped as a replay, or failed
        self._runs: dict[str, OpenRun] = {}
        self._failed: list[tuple[int, str, str]] = []  # (records, what, error)
        self._error: str | None = None  # the store's last error while it is out of reach
        self._progress = time.monotonic()  # last time a record finished (or the writer got work when idle)
        self._thread: threading.Thread | None = None
        self._mlc: Any = None
        self._stall_reported = False

    # ------------------------------------------------------------------------------ the caller's side
    def open(self, key: str, fn: Callable[[Any], OpenRun]) -> None:
        """Resolve ``key`` to its run: ``fn(mlflow_client)`` finds or creates it (once per key; it is
        called again after a failed attempt, so it must find what an earlier attempt created)."""
        self._submit(_Op(key, "open", "the run", fn=fn))

    def log(self, key: str, step: int, metrics: list[Any], tags: dict[str, Any] | None = None) -> None:
        """One step's metrics (``mlflow.entities.Metric``, timestamped by the caller) and tags."""
        self._submit(_Op(key, "log", f"step {step}", step=step, metrics=list(metrics), tags=dict(tags or {})))

    def call(self, key: str, fn: Callable[[Any, OpenRun], None], what: str) -> None:
        """``fn(mlflow_client, run)`` after the records before it; skipped for a run that had ended."""
        self._submit(_Op(key, "call", what, fn=fn))

    def run(self, key: str) -> OpenRun | None:
        """The run of ``key`` once the writer has opened it (after a flush: whether it had ended)."""
        return self._runs.get(key)

    def flush(self, key: str | None = None) -> bool:
        """Wait until every record of ``key`` (of every key) submitted so far is written; False when the
        writer stalled (finished nothing for ``stall_s``) first, the records then stay queued."""
        with self._cond:
            target = dict(self._submitted) if key is None else {key: self._submitted.get(key, 0)}
            while any(self._finished.get(k, 0) < n for k, n in target.items()):
                left = self.stall_s - (time.monotonic() - self._progress)
                if left <= 0:
                    self._report_stall()
                    return False
                self._cond.wait(min(left, 1.0))  # short waits: Ctrl-C is seen at once
            return True

    def unwritten(self) -> tuple[int, str | None]:
        """(records not written, the reason): still queued, or rejected by the store."""
        with self._cond:
            queued = sum(self._submitted.values()) - sum(self._finished.values())
            failed = sum(n for n, _, _ in self._failed)
            if queued:
                reason = self._error or f"the store took no record for {self.stall_s:.0f} s"
            else:
                reason = self._failed[0][2] if self._failed else None
            return queued + failed, reason

    def close(self) -> None:
        """Flush everything (bounded by ``stall_s`` without progress); raises
        :class:`~ltstudy.errors.TrackingWriteError` when records were not written. The thread stays a
        daemon: a store that never answers cannot keep the process alive."""
        self.flush()
        atexit.unregister(self._at_exit)
        n, reason = self.unwritten()
        if n:
            raise TrackingWriteError(f"{n} MLflow record(s) were not written to {self.uri}: {reason}")

    def _submit(self, op: _Op) -> None:
        with self._cond:
            if sum(self._submitted.values()) == sum(self._finished.values()):
                self._progress = time.monotonic()  # idle until now: the stall clock starts here
            self._queue.append(op)
            self._submitted[op.key] = self._submitted.get(op.key, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="ltstudy-mlflow-writer", daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)
            self._cond.notify_all()

    def _report_stall(self) -> None:
        if not self._stall_reported:
            self._stall_reported = True
            logger.warning("MLflow at %s took no record for %.0f s (%s); the records stay queued and are "
                           "retried, and the study fails at its end if they cannot be written", self.uri,
                           self.stall_s, self._error or "a write is still running")

    def _at_exit(self) -> None:
        """Last resort for a process that never called :meth:`close`: write what is left, or say so."""
        self.flush()
        n, reason = self.unwritten()
        if n:
            print(f"error: {n} MLflow record(s) were not written to {self.uri}: {reason}", file=sys.stderr)

    # ------------------------------------------------------------------------------ the writer thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                window, self._queue = self._queue, []
            for group in _groups(window):
                self._write(group)
                with self._cond:
                    key = group[0].key
                    self._finished[key] = self._finished.get(key, 0) + len(group)
                    self._progress = time.monotonic()
                    self._cond.notify_all()

    def _write(self, group: list[_Op]) -> None:
        """Write one group (an open, a call, or consecutive per-step records of one key), retrying while
        the store is out of reach; a rejected group is counted in :meth:`unwritten`."""
        first = group[0]
        run = self._runs.get(first.key)
        if first.kind == "open" and run is not None:
            return  # opened before (a trial restarted in this process)
        if first.kind != "open":
            if run is None:  # its open was rejected
                with self._cond:
                    self._failed.append((len(group), first.what, f"no MLflow run for {first.key}"))
                return
            if run.ended:
                return
        if first.kind == "log":
            group = _new_steps(group, run.logged)  # a replayed step was written before
            if not group:
                return
        delay = self.backoff_s[0]
        while True:
            try:
                if self._mlc is None:
                    self._mlc = self.client_factory(self.uri)
                self._apply(group, run)
                break
            except Exception as exc:  # noqa: BLE001 - sorted below: retried, or counted and reported
                if not transient(exc):
                    what = first.what if len(group) == 1 else f"{first.what} to {group[-1].what}"
                    logger.warning("MLflow at %s rejected %s of %s: %s", self.uri, what, first.key, _one_line(exc))
                    with self._cond:
                        self._failed.append((len(group), what, _one_line(exc)))
                    return
                if self._error is None:
                    logger.warning("MLflow at %s is out of reach (%s); retrying", self.uri, _one_line(exc))
                self._error = _one_line(exc)
                time.sleep(delay)
                delay = min(2 * delay, self.backoff_s[1])
        if self._error is not None:
            logger.warning("MLflow at %s takes records again", self.uri)
            self._error, self._stall_reported = None, False

    def _apply(self, group: list[_Op], run: OpenRun | None) -> None:
        first = group[0]
        if first.kind == "open":
            self._runs[first.key] = first.fn(self._mlc)
        elif first.kind == "call":
            first.fn(self._mlc, run)
        else:
            tags: dict[str, Any] = {}
            for op in group:
                tags.update(op.tags)
            log_batch(self._mlc, run.run_id, metrics=[m for op in group for m in op.metrics], tags=tags)
            run.logged = group[-1].step


def _new_steps(group: list[_Op], logged: int) -> list[_Op]:
    """The records of steps after ``logged``, each step once (a trial restarted from a checkpoint reports
    the epochs after it again, exactly as before)."""
    out = []
    for op in group:
        if op.step > logged:
            out.append(op)
            logged = op.step
    return out


def _groups(window: list[_Op]) -> Iterator[list[_Op]]:
    """The ops of each key in their order, consecutive per-step records of a key as one group (the
    keys' relative order does not matter: each run's records only depend on that run's earlier ones)."""
    by_key: dict[str, list[_Op]] = {}
    for op in window:
        by_key.setdefault(op.key, []).append(op)
    for ops in by_key.values():
        group: list[_Op] = []
        for op in ops:
            if group and not (op.kind == "log" and group[-1].kind == "log"):
                yield group
                group = []
            group.append(op)
        yield group
