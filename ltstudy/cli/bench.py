"""``ltstudy bench train|features|study``: throughput, memory and study-overhead benchmarks."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ltstudy.cli.common import OVERRIDES, bench_app, console


@bench_app.command("train")
def bench_train(
    method: str = typer.Option("ce", "--method", "-m"),
    model: str = typer.Option("resnet32", help="backbone"),
    batch_size: int = typer.Option(128),
    steps: int = typer.Option(30, help="timed steps per repeat"),
    repeats: int = typer.Option(5, help="repeats; the median is reported"),
    device: str = typer.Option("auto"),
) -> None:
    """Training and evaluation images/s and peak memory on the current device."""
    from ltstudy.experiments.bench_train import bench_train as run

    result = run(method=method, model=model, batch_size=batch_size, steps=steps, repeats=repeats,
                 device=device)
    table = Table(title=f"bench train: {method} / {model}, batch {batch_size} on {result['device']}")
    for col in ("train img/s", "eval img/s", "peak memory MiB"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['train_images_per_s']:.0f}", f"{result['eval_images_per_s']:.0f}",
                  f"{result['peak_memory_mib']:.0f}")
    console.print(table)


@bench_app.command("features")
def bench_features_cmd(
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="backbone (default: a 1-epoch synthetic one)"),
    storage: str | None = typer.Option(None, "--storage", help="cache root (default: a temp dir)"),
    method: str = typer.Option("ce_classifier", "--method", "-m", help="feature-stage method to time"),
    repeats: int = typer.Option(5, help="whole reads; the median is reported"),
    device: str = typer.Option("auto"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Parquet read MB/s, one feature-stage trial's wall time, and the time to recompute the features."""
    from ltstudy.experiments.bench_features import bench_features

    r = bench_features(checkpoint=str(checkpoint) if checkpoint else None, storage=storage, method=method,
                       repeats=repeats, device=device, overrides=overrides or [])
    table = Table(title=f"bench features on {r['device']} ({r['rows']} rows, {r['megabytes']:.1f} MB)")
    for col in ("read MB/s (median)", f"{method} trial s", "recompute features s", "extract+write s"):
        table.add_column(col, justify="right")
    table.add_row(f"{r['read_mb_per_s']:.0f}", f"{r['trial_seconds']:.2f}", f"{r['recompute_seconds']:.2f}",
                  f"{r['extract_seconds']:.2f}")
    console.print(table)


@bench_app.command("study")
def bench_study_cmd(
    trials: int = typer.Option(3, help="trials per configuration"),
    epochs: int = typer.Option(2),
) -> None:
    """Per-trial overhead (trial wall time minus time in run_trial), 1 and 2 workers; trials/hour."""
    from ltstudy.experiments.bench_study import bench_study

    rows = bench_study(trials=trials, epochs=epochs)
    table = Table(title="bench study (medians)")
    for col in ("workers", "trials", "trial wall s", "in run_trial s", "overhead s", "trials/hour"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["workers"]), str(r["trials"]), f"{r['wall_s']:.1f}", f"{r['run_trial_s']:.1f}",
                      f"{r['overhead_s']:.1f}", f"{r['trials_per_hour']:.0f}")
    console.print(table)
