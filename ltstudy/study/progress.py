"""Progress of a running study that a person can follow (instead of Ray's result tables).

One line when a trial starts (its tuned values) and one when it ends (outcome, epochs run, objective,
wall time). On a terminal a live footer below those lines shows trials done / running / pruned / failed,
each running trial's epoch, the best value so far and an estimate of the time left (rich ``Live``). When
stdout is not a terminal (CI, ``| tee``) there is no footer and nothing is redrawn: each end line carries
the same counts, so the output is one plain line per event and never a table wrapped at 80 columns.

:class:`ProgressBoard` holds the state and does the printing (no Ray: unit-testable, and cheap to import
for the other commands that format durations); :class:`ltstudy.study.callbacks.ProgressCallback` feeds it
from Ray Tune's callback hooks in the driver.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.text import Text


def fmt_value(metric: str, value: float | None) -> str:
    """Accuracies in %, losses as they are."""
    if value is None or value != value:
        return "–"
    return f"{value:.4f}" if metric.endswith("loss") else f"{100 * value:.2f}%"


def fmt_params(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def fmt_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class _Running:
    label: str
    started: float
    epoch: int = 0
    epochs_total: int = 0
    value: float | None = None


@dataclass
class ProgressBoard:
    """What a study has done so far, printed as it happens to ``console``."""

    console: Console
    metric: str
    mode: str
    num_trials: int
    concurrency: int = 1
    live: bool | None = None  # None: a footer only when the console is a terminal
    running: dict[str, _Running] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"completed": 0, "pruned": 0, "budget": 0, "failed": 0})
    walls: list[float] = field(default_factory=list)
    best: tuple[float, str] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: set[str] = set()  # trials a resumed study had already ended (seed)
        self._best_key: tuple[float, float] = (-math.inf, -math.inf)
        self._live = None
        if self.live is None:
            self.live = self.console.is_terminal
        if self.live:
            from rich.live import Live  # only on a terminal: a plain run never sets up a live display

            self._live = Live(console=self.console, get_renderable=self.footer, refresh_per_second=2,
                              transient=True, redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    # ----------------------------------------------------------------------------------- events
    def say(self, line: str) -> None:
        """One plain line (never wrapped or highlighted), above the footer when there is one."""
        self.console.print(Text(line), soft_wrap=True, highlight=False)

    def start(self, key: str, label: str, params: dict[str, Any]) -> None:
        with self._lock:
            if key in self.running:  # restarted after a worker failure: keep its first start time
                return
            self.running[key] = _Running(label, time.monotonic())
        self.say(f"{label} started: {fmt_params(params) or '(no tuned parameter)'}")

    def result(self, key: str, epoch: int | None, epochs_total: int | None, value: float | None) -> None:
        with self._lock:
            r = self.running.get(key)
            if r is not None and epoch is not None:
                r.epoch, r.epochs_total, r.value = int(epoch), int(epochs_total or 0), value

    def end(self, key: str, label: str, outcome: str, epoch: int, epochs_total: int, value: float | None,
            error: str | None = None, number: int | None = None) -> None:
        with self._lock:
            r = self.running.pop(key, None)
            wall = time.monotonic() - r.started if r is not None else None
            if wall is not None:
                self.walls.append(wall)
            if key in self._ended:  # ended before the driver stopped; Tune replays its end: counted once
                return
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if outcome == "completed" and value is not None and value == value:
                self._consider(value, number, label)
            line = (f"{label}: {outcome} after epoch {epoch}/{epochs_total}, {self.metric} "
                    f"{fmt_value(self.metric, value)}" + (f", {fmt_duration(wall)}" if wall is not None else "")
                    + (f" ({error})" if error else ""))
            if not self.live:
                line += f" | {self.status()}"
        self.say(line)

    def seed(self, trials: list[dict[str, Any]]) -> None:
        """Count the trials a resumed study had already finished (``records.study_trials`` rows: status,
        metrics, number) and take the best completed one so far."""
        for t in trials:
            if t["status"] in self.counts:
                self.counts[t["status"]] += 1
                self._ended.add(t.get("trial_id"))
            value = t.get("metrics", {}).get(self.metric)
            if t["status"] == "completed" and value is not None and value == value:
                label = f"trial {t['number']}" if t.get("number") is not None else f"trial {t['trial_id']}"
                self._consider(value, t.get("number"), label)

    def _consider(self, value: float, number: int | None, label: str) -> None:
        """The best so far: the better value, on a tie the earlier trial (what the summary and the export
        pick: :meth:`~ltstudy.study.results.selection.Objectives.ranked`)."""
        sign = 1 if self.mode == "max" else -1
        key = (sign * value, -number if number is not None else -math.inf)
        if self.best is None or key > self._best_key:
            self.best, self._best_key = (value, label), key

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ---------------------------------------------------------------------------------- the footer
    def done(self) -> int:
        return sum(self.counts.values())

    def eta(self) -> float | None:
        """Seconds left: the mean trial so far for the ones not started, what is left of the running
        ones, spread over the trials that run at once."""
        now = time.monotonic()
        if self.walls:
            per_trial = statistics.fmean(self.walls)
        else:
            guesses = [(now - r.started) / r.epoch * r.epochs_total for r in self.running.values()
                       if r.epoch and r.epochs_total]
            if not guesses:
                return None
            per_trial = statistics.median(guesses)
        left = sum(max(per_trial - (now - r.started), 0.0) for r in self.running.values())
        waiting = max(self.num_trials - self.done() - len(self.running), 0)
        return (left + waiting * per_trial) / max(1, min(self.concurrency, self.num_trials))

    def status(self) -> str:
        c = self.counts
        best = (f"best {self.metric} {fmt_value(self.metric, self.best[0])} ({self.best[1]})"
                if self.best else "best: none completed yet")
        eta = self.eta()
        left = "done" if self.done() >= self.num_trials else (
            f"~{fmt_duration(eta)} left" if eta is not None else "time left: after the first epoch")
        cut = f"{c['budget']} cut by the budget · " if c.get("budget") else ""
        return (f"{self.done()}/{self.num_trials} done · {len(self.running)} running · {c['pruned']} pruned · "
                f"{cut}{c['failed']} failed · {best} · {left}")

    def footer(self) -> Group:
        with self._lock:
            rows = [Text(f"  {r.label}: epoch {r.epoch}/{r.epochs_total or '?'}, {self.metric} "
                         f"{fmt_value(self.metric, r.value)}, {fmt_duration(time.monotonic() - r.started)}",
                         style="dim") for r in self.running.values()]
            return Group(Text(self.status(), style="bold"), *rows)
