"""Compare methods over seeds: the runs behind the results in the docs (docs/results.md).

``compare(methods, seeds, values)`` trains every (method, seed) pair with the same settings and returns
one row per method with the mean and standard deviation over seeds of the validation and test metrics.
A :class:`CompareTracker` records the comparison in MLflow as an experiment of its own (a parent run with
the table and the per-bucket figure, a child run per (method, seed) with its per-epoch metrics, its
per-class accuracy and its data); a :class:`CompareProgress` shows run i of N, the epoch and the time left.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltstudy.config import TrialConfig, resolve_config
from ltstudy.train import TrialContext, run_trial

COLUMNS = [f"{split}_{m}" for split in ("val", "test") for m in ("top1", "many", "medium", "few")]


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def plan_runs(methods: list[str], seeds: list[int], values: dict[str, Any],
              per_method: dict[str, dict[str, Any]] | None = None) -> list[TrialConfig]:
    """Every (method, seed) config, resolved up front so a bad value fails before the first run.

    ``per_method`` adds settings for one method only (e.g. a feature-stage method's ``backbone``); a value
    containing ``{seed}`` is formatted with the run's seed.
    """
    configs = []
    for method in methods:
        for seed in seeds:
            extra = {k: v.format(seed=seed) if isinstance(v, str) else v
                     for k, v in {**values, **(per_method or {}).get(method, {})}.items()}
            configs.append(resolve_config({**extra, "method": method, "seed": seed}))
    return configs


def compare(methods: list[str], seeds: list[int], values: dict[str, Any],
            on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
            per_method: dict[str, dict[str, Any]] | None = None,
            checkpoint_root: str | None = None, progress: CompareProgress | None = None,
            tracker: CompareTracker | None = None) -> dict[str, dict[str, tuple]]:
    """Mean ± std over ``seeds`` of :data:`COLUMNS` for each method; ``values`` apply to every run.

    With ``checkpoint_root`` each run keeps its final checkpoint in ``<root>/<method>-seed<seed>/`` (a
    backbone for feature-stage methods). ``progress`` and ``tracker`` see every epoch of every run.
    """
    configs = plan_runs(methods, seeds, values, per_method)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for i, cfg in enumerate(configs):
        method, seed = cfg.method, cfg.train.seed
        ctx = TrialContext(checkpoint_dir=f"{checkpoint_root}/{method}-seed{seed}" if checkpoint_root else None)
        if progress is not None:
            progress.run_start(i, cfg)
        run_id = tracker.run_start(cfg) if tracker is not None else None

        def report(m: dict[str, Any], checkpoint: str | None, run_id: str | None = run_id) -> None:
            if progress is not None:
                progress.epoch(m)
            if tracker is not None:
                tracker.epoch(run_id, m)

        metrics = run_trial(cfg, report=report, ctx=ctx)
        results[method].append(metrics)
        if tracker is not None:
            tracker.run_end(run_id, cfg, metrics)
        if progress is not None:
            progress.run_end(cfg, metrics)
        if on_run is not None:
            on_run(method, seed, metrics)
    rows = {m: {c: mean_std([r[c] for r in runs]) for c in COLUMNS} for m, runs in results.items()}
    if tracker is not None:
        tracker.finish(rows)
    return rows


def markdown(rows: dict[str, dict[str, tuple]]) -> str:
    """The rows as a Markdown table, accuracies in % as mean ± std."""
    head = "| method | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for method, row in rows.items():
        cells = ["–" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in row.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- progress
@dataclass
class CompareProgress:
    """Run i of N, its epoch and the time left: a live bar on a terminal, else plain lines (a line when a
    run starts and ends, and an epoch line at most every ``every_s`` seconds)."""

    console: Any
    configs: list[TrialConfig]
    every_s: float = 30.0
    _start: float = field(default_factory=time.monotonic)
    _done_epochs: int = 0
    _last_line: float = 0.0
    _current: tuple[int, TrialConfig] | None = None

    def __post_init__(self) -> None:
        self.total_epochs = sum(c.train.epochs for c in self.configs)
        self._bar = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("epochs"), TimeRemainingColumn(), console=self.console)
            self._task = self._bar.add_task("starting", total=self.total_epochs)
            self._bar.start()

    def _name(self) -> str:
        i, cfg = self._current
        return f"[{i + 1}/{len(self.configs)}] {cfg.method} seed {cfg.train.seed}"

    def _left(self) -> str:
        if not self._done_epochs:
            return "time left: after the first epoch"
        from ltstudy.study.progress import fmt_duration

        per_epoch = (time.monotonic() - self._start) / self._done_epochs
        return f"~{fmt_duration(per_epoch * (self.total_epochs - self._done_epochs))} left"

    def _say(self, line: str) -> None:
        self.console.print(line, soft_wrap=True, highlight=False, markup=False)
        self._last_line = time.monotonic()

    def run_start(self, i: int, cfg: TrialConfig) -> None:
        self._current = (i, cfg)
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self._name()} · epoch 0/{cfg.train.epochs}")
        else:
            self._say(f"{self._name()}: started ({cfg.train.epochs} epochs) · {self._left()}")

    def epoch(self, m: dict[str, Any]) -> None:
        from ltstudy.study.progress import fmt_value

        self._done_epochs += 1
        cfg = self._current[1]
        text = (f"{self._name()} · epoch {m['epoch']}/{cfg.train.epochs} · val top-1 "
                f"{fmt_value('val_top1', m.get('val_top1'))}")
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)
        elif time.monotonic() - self._last_line >= self.every_s and m["epoch"] < cfg.train.epochs:
            self._say(f"{text} · {self._left()}")

    def run_end(self, cfg: TrialConfig, m: dict[str, Any]) -> None:
        from ltstudy.study.progress import fmt_value

        line = (f"{self._name()}: val top-1 {fmt_value('val_top1', m.get('val_top1'))}, test top-1 "
                f"{fmt_value('test_top1', m.get('test_top1'))}, many/med/few "
                + "/".join(fmt_value("t", m.get(f"test_{b}")) for b in ("many", "medium", "few"))
                + f" · {self._left() if self._done_epochs < self.total_epochs else 'done'}")
        if self._bar is not None:
            self._bar.console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            self._say(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ------------------------------------------------------------------------------------------- MLflow
class CompareTracker:
    """The comparison as its own MLflow experiment: a parent run, a child run per (method, seed)."""

    def __init__(self, uri: str, name: str, methods: list[str], seeds: list[int],
                 values: dict[str, Any]) -> None:
        from ltstudy.study.tracking.store import (
            EXPERIMENT_KIND,
            TrackingError,
            artifact_location,
            client,
            git_commit,
            log_batch,
        )

        self.uri, self.name = uri, name
        self.mlc = client(uri)
        if self.mlc.get_experiment_by_name(name) is not None:
            raise TrackingError(f"an MLflow experiment named {name!r} already exists in {uri}; pick another "
                                "--experiment")
        self.experiment_id = self.mlc.create_experiment(name, artifact_location=artifact_location(uri, name),
                                                        tags={"ltstudy.compare": name, **EXPERIMENT_KIND})
        self.commit = git_commit()
        run = self.mlc.create_run(self.experiment_id, run_name=name, tags={"ltstudy.role": "compare"})
        self.parent = run.info.run_id
        log_batch(self.mlc, self.parent, params={"methods": ",".join(methods),
                                                 "seeds": ",".join(map(str, seeds)),
                                                 **{f"set.{k}": str(v) for k, v in values.items()}},
                  tags={"git_commit": self.commit})
        self._datasets: dict[tuple, Any] = {}

    def url(self) -> str:
        from ltstudy.study.tracking.store import run_url

        return run_url(self.uri, self.experiment_id, self.parent)

    def run_start(self, cfg: TrialConfig) -> str:
        from ltstudy.study.tracking.dataset import data_key, dataset_record
        from ltstudy.study.tracking.store import PARENT_TAG, log_batch, params_as_strings

        flat = cfg.to_dict()
        run = self.mlc.create_run(self.experiment_id, run_name=f"{cfg.method}-seed{cfg.train.seed}", tags={
            PARENT_TAG: self.parent, "ltstudy.role": "compare-run"})
        log_batch(self.mlc, run.info.run_id, params=params_as_strings(flat),
                  tags={"method": cfg.method, "dataset": flat["dataset"], "imbalance": flat["imbalance"],
                        "seed": cfg.train.seed, "git_commit": self.commit})
        key = data_key(cfg)
        if key not in self._datasets:
            try:
                self._datasets[key] = dataset_record(cfg)
            except Exception:  # noqa: BLE001 - the run itself reports unreadable data
                self._datasets[key] = None
        if self._datasets[key] is not None:
            self.mlc.log_inputs(run.info.run_id, datasets=[self._datasets[key].to_mlflow()])
        return run.info.run_id

    def epoch(self, run_id: str, m: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        from ltstudy.study.tracking.store import log_batch, trial_metrics

        now = int(time.time() * 1000)
        log_batch(self.mlc, run_id, metrics=[Metric(k, v, now, int(m["epoch"]))
                                             for k, v in trial_metrics(m).items()])

    def run_end(self, run_id: str, cfg: TrialConfig, m: dict[str, Any]) -> None:
        from ltstudy.study.tracking.dataset import data_key
        from ltstudy.study.tracking.figures import per_class_png

        per_class = {k: m[k] for k in ("val_per_class", "test_per_class") if k in m}
        self.mlc.log_dict(run_id, per_class, "per_class_accuracy.json")
        record = self._datasets.get(data_key(cfg))
        if record is not None and per_class:
            png = per_class_png(record.class_counts, {k.split("_")[0]: v for k, v in per_class.items()},
                                f"{cfg.method} seed {cfg.train.seed}: accuracy per class",
                                record.many_threshold, record.few_threshold, record.class_names)
            self._log_bytes(run_id, "per_class_accuracy.png", png)
        self.mlc.set_terminated(run_id, "FINISHED")

    def _log_bytes(self, run_id: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(data)
            self.mlc.log_artifact(run_id, str(Path(tmp) / name))

    def finish(self, rows: dict[str, dict[str, tuple]]) -> None:
        from mlflow.entities import Metric

        from ltstudy.study.results.plots import bucket_png
        from ltstudy.study.tracking.store import log_batch

        now = int(time.time() * 1000)
        metrics = [Metric(f"{method}.{col}.{stat}", float(v), now, 0)
                   for method, row in rows.items() for col, pair in row.items()
                   for stat, v in zip(("mean", "std"), pair, strict=True) if not math.isnan(v)]
        log_batch(self.mlc, self.parent, metrics=metrics)
        self.mlc.log_text(self.parent, markdown(rows) + "\n", "compare.md")
        self._log_bytes(self.parent, "buckets.png", bucket_png(rows))
        self.mlc.set_terminated(self.parent, "FINISHED")

    def fail(self) -> None:
        self.mlc.set_terminated(self.parent, "FAILED")
