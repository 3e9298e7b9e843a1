"""``ltstudy bench train|features|study``: throughput, memory and study-overhead benchmarks."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ltstudy.cli.common import OVERRIDES, bench_app, console
from ltstudy.errors import LtstudyError


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


def _shape(text: str, parts: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != parts or min(values) < 1:
        raise LtstudyError(f"shape {text!r} must be {parts} positive integers joined by 'x'")
    return values


@bench_app.command("features")
def bench_features_cmd(
    part: list[str] | None = typer.Option(None, "--part", help="cache | read | tailcalibx (repeatable; "
                                          "default: all three)"),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="cache: backbone (default: a 1-epoch "
                                           "synthetic one)"),
    storage: str | None = typer.Option(None, "--storage", help="cache / read: cache root (default: a temp dir)"),
    method: str = typer.Option("ce_classifier", "--method", "-m", help="cache: feature-stage method to time"),
    repeats: int = typer.Option(5, help="whole reads; the median is reported"),
    read_shape: list[str] | None = typer.Option(None, "--read-shape", help="read: ROWSxDIM float32 features "
                                                "(default 100000x512 and 115846x2048, ImageNet-LT's)"),
    tailcalibx_shape: str = typer.Option("115846x2048x1000", help="tailcalibx: ROWSxDIMxCLASSES (ROWS is a "
                                         "target: the profile keeps ImageNet-LT's head 1,280 and tail 5)"),
    epochs: int = typer.Option(1, help="tailcalibx: epochs (median seconds per epoch)"),
    device: str = typer.Option("auto"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Feature cache: read MB/s beside the raw file read, a trial on the cache vs recomputing the features;
    TailCalibX's set-up, seconds per epoch and peak memory on ImageNet-LT-shaped features."""
    from ltstudy.experiments import bench_features as bench

    parts = part or ["cache", "read", "tailcalibx"]
    unknown = sorted(set(parts) - {"cache", "read", "tailcalibx"})
    if unknown:
        raise LtstudyError(f"unknown --part {unknown[0]!r}; choose cache, read or tailcalibx")
    shapes = [_shape(s, 2) for s in (read_shape or ["100000x512", "115846x2048"])]
    rows, dim, classes = _shape(tailcalibx_shape, 3)
    if "cache" in parts:
        r = bench.bench_cache(checkpoint=str(checkpoint) if checkpoint else None, storage=storage,
                              method=method, repeats=repeats, device=device, overrides=overrides or [])
        table = Table(title=f"bench features: cache on {r['device']} ({r['rows']} rows, {r['megabytes']:.1f} MB)")
        for col in ("read MB/s (median)", f"{method} trial s", "recompute features s", "extract+write s"):
            table.add_column(col, justify="right")
        table.add_row(f"{r['read_mb_per_s']:.0f}", f"{r['trial_seconds']:.2f}", f"{r['recompute_seconds']:.2f}",
                      f"{r['extract_seconds']:.2f}")
        console.print(table)
    if "read" in parts:
        table = Table(title=f"bench features: read (train split, medians of {repeats}; MB/s)")
        for col in ("rows x dim", "MB", "cold: cat", "cold: first read", "cold: read", "cold ratio", "warm: cat",
                    "warm: read", "warm ratio"):
            table.add_column(col, justify="right")
        for r in bench.bench_read(shapes, storage=storage, repeats=repeats):
            table.add_row(f"{r['rows']} x {r['dim']}", f"{r['megabytes']:.0f}", f"{r['cold_raw_mb_per_s']:.0f}",
                          f"{r['cold_first_mb_per_s']:.0f}", f"{r['cold_read_mb_per_s']:.0f}",
                          f"{r['cold_ratio']:.2f}", f"{r['warm_raw_mb_per_s']:.0f}",
                          f"{r['warm_read_mb_per_s']:.0f}", f"{r['warm_ratio']:.2f}")
        console.print(table)
        console.print("cat: `cat file > /dev/null`; first read: the first of a process (checks the sha256); "
                      "read: later ones; cold: the file's pages dropped before each read")
    if "tailcalibx" in parts:
        r = bench.bench_tailcalibx(classes=classes, dim=dim, epochs=epochs, rows=rows)
        table = Table(title=f"bench features: TailCalibX on random features, {r['rows']} x {r['dim']}, "
                            f"{r['classes']} classes (CPU)")
        for col in ("set-up s", "s / epoch", "steps / epoch", "peak RSS MiB", "of which features MiB"):
            table.add_column(col, justify="right")
        table.add_row(f"{r['prepare_seconds']:.1f}", f"{r['epoch_seconds']:.1f}", str(r["steps_per_epoch"]),
                      f"{r['peak_rss_mib']:.0f}", f"{r['features_mib']:.0f}")
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
