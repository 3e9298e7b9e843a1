"""``ltstudy bench train|features|study|stopping|cluster``: throughput, memory and study-overhead benchmarks."""

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
    compile: bool = typer.Option(False, "--compile", help="the network under torch.compile"),
) -> None:
    """Training and evaluation images/s and peak memory on the current device."""
    from ltstudy.experiments.bench_train import bench_train as run

    result = run(method=method, model=model, batch_size=batch_size, steps=steps, repeats=repeats,
                 device=device, compile=compile)
    table = Table(title=f"bench train: {method} / {model}, batch {batch_size} on {result['device']}"
                        + (", torch.compile" if compile else ""))
    for col in ("train img/s", "eval img/s", "peak memory MiB"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['train_images_per_s']:.0f}", f"{result['eval_images_per_s']:.0f}",
                  f"{result['peak_memory_mib']:.0f}")
    console.print(table)


@bench_app.command("lift")
def bench_lift_cmd(
    model: str = typer.Option("open_clip:ViT-B-16", help="the network's shape (random weights; nothing is "
                              "downloaded): open_clip:ARCH or timm:NAME"),
    batch_size: int = typer.Option(16, help="images per step"),
    steps: int = typer.Option(3, help="timed steps per repeat"),
    repeats: int = typer.Option(3, help="repeats; the median is reported"),
    device: str = typer.Option("auto"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """LIFT's cost: training and evaluation images/s, seconds per CIFAR-100-LT epoch, trained-parameter share."""
    from ltstudy.config import parse_overrides
    from ltstudy.experiments.bench_lift import CIFAR100_LT_TRAIN, CIFAR100_TEST, bench_lift

    r = bench_lift(model=model, batch_size=batch_size, steps=steps, repeats=repeats, device=device,
                   overrides=parse_overrides(overrides or []))
    table = Table(title=f"bench lift: {r['model']} at {r['side']} px (random weights), batch {r['batch_size']} "
                        f"on {r['device']}" + (", bf16/fp16 autocast" if r["amp"] else ""))
    for col in ("train img/s", "eval img/s", "eval img/s (5-crop TTE)", f"s/epoch ({CIFAR100_LT_TRAIN:,} img)",
                f"test s ({CIFAR100_TEST:,} img, TTE)", "trained params", "share"):
        table.add_column(col, justify="right")
    table.add_row(f"{r['train_images_per_s']:.2f}", f"{r['eval_images_per_s']:.2f}",
                  f"{r['eval_tte_images_per_s']:.2f}", f"{r['epoch_seconds']:.0f}", f"{r['test_tte_seconds']:.0f}",
                  f"{r['trained_parameters']:,} of {r['parameters']:,}", f"{100 * r['trained_share']:.3f}%")
    console.print(table)
    console.print("s/epoch and test s scale the measured rates to CIFAR-100-LT IF 100 (10,847 training, 10,000 "
                  "test images)", highlight=False)


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
    trials: int = typer.Option(8, help="trials per study"),
    epochs: int = typer.Option(2, help="epochs per trial"),
    workers: str = typer.Option("1,2", help="workers per trial to compare, comma-separated"),
    cpus: int | None = typer.Option(None, help="cores the studies fill (default: all of this machine's)"),
    gpu: bool = typer.Option(False, "--gpu", help="pack 1, 2, 4, 8 trials onto each GPU instead"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """What a study costs: real `ltstudy tune` runs timed from start to exit; the machine's share used."""
    from ltstudy.experiments.bench_study import bench_gpu_packing, bench_study
    from ltstudy.study.startup import STAGES

    extra = overrides or []
    if gpu:
        rows, advice = bench_gpu_packing(epochs=epochs, overrides=extra)
        table = Table(title="bench study --gpu: trials sharing each GPU (process start to exit)")
        for col in ("trials per GPU", "trials", "wall s", "aggregate train img/s", "trials/hour per GPU",
                    "share used"):
            table.add_column(col, justify="right")
        for r in rows:
            if "error" in r:
                table.add_row(str(r["per_gpu"]), "-", "-", "-", "-", r["error"])
                continue
            table.add_row(str(r["per_gpu"]), str(r["trials"]), f"{r['wall_s']:.1f}", f"{r['images_per_s']:.0f}",
                          f"{r['trials_per_hour_per_gpu']:.0f}", f"{r['share']:.2f}")
        console.print(table)
        console.print(f"recommendation: {advice}", highlight=False)
        return
    try:
        counts = tuple(int(w) for w in workers.split(","))
    except ValueError:
        raise typer.BadParameter(f"--workers takes numbers like 1,2; got {workers!r}") from None
    rows = bench_study(trials=trials, epochs=epochs, workers=counts, cpus=cpus, overrides=extra)
    table = Table(title=f"bench study: {trials} trials x {epochs} epochs (process start to exit)")
    for col in ("trials", "wall s", "in run_trial s", "share used", "trials/hour", "reused", "start-up s"):
        table.add_column(col, justify="right")
    table.add_column("configuration")
    for r in rows:
        table.add_row(f"{r['completed']}/{r['trials']}", f"{r['wall_s']:.1f}", f"{r['in_trial_s']:.1f}",
                      f"{r['share']:.2f}", f"{r['trials_per_hour']:.0f}", str(r["reused"]),
                      f"{r['startup'].get('startup_s', float('nan')):.1f}", r["config"])
    console.print(table)
    stages = Table(title="start-up of a trial, stage by stage (medians, s)")
    stages.add_column("configuration")
    for key, (name, _) in STAGES.items():
        if any(key in r["startup"] for r in rows):
            stages.add_column(name, justify="right")
    for r in rows:
        stages.add_row(r["config"], *[f"{r['startup'][k]:.2f}" if k in r["startup"] else "-"
                                     for k in STAGES if any(k in x["startup"] for x in rows)])
    console.print(stages)


@bench_app.command("stopping")
def bench_stopping_cmd(
    method: str = typer.Option("ldam_drw", "--method", "-m", help="the method studied"),
    epochs: int = typer.Option(9, help="the full recipe's epochs (halving runs it at a third, a ninth, ...)"),
    configs: int = typer.Option(4, help="configurations halving starts from; no stopping gets as many as the "
                                       "same epochs buy"),
    plain_configs: int | None = typer.Option(None, help="configurations without stopping (default: as many as "
                                                        "halving's epochs buy; --configs: the same ones)"),
    seeds: str = typer.Option("0,1,2", help="study seeds, comma-separated"),
    confirm_seeds: int = typer.Option(3, help="confirmation seeds of the winner and the published trial"),
    dataset: str = typer.Option("cifar10-lt", "--dataset", "-d"),
    data_root: str | None = typer.Option(None, help="folder holding the dataset"),
    backbone: str | None = typer.Option(None, help="feature-stage methods: the backbone checkpoint (its data "
                                                   "are the study's; --dataset and --data-root are not used)"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Successive halving vs no stopping at equal total epochs: epochs, confirmed winner, test, gain."""
    from ltstudy.experiments.bench_stopping import bench_stopping

    try:
        seed_list = tuple(int(s) for s in seeds.split(","))
    except ValueError:
        raise typer.BadParameter(f"--seeds takes numbers like 0,1,2; got {seeds!r}") from None
    flags = ["--backbone", backbone] if backbone else \
        ["--dataset", dataset, *(["--data-root", data_root] if data_root else [])]
    r = bench_stopping(method=method, epochs=epochs, configs=configs, seeds=seed_list,
                       confirm_seeds=confirm_seeds, flags=flags, overrides=overrides or [],
                       plain_configs=plain_configs)
    steps = ", ".join(f"{b.trials} x {b.epochs}" for b in r["budgets"])
    table = Table(title=f"bench stopping: {method} on {'features of ' + backbone if backbone else dataset}, "
                        f"{epochs} epochs; halving {steps}, none "
                        f"{r['plain']} x {epochs}; confirmed on {confirm_seeds} seeds")
    for col in ("seed", "scheduler", "trials", "epochs", "confirm epochs", "val (95% CI)", "test",
                "gain over published (95% CI)", "wall s"):
        table.add_column(col, justify="right")
    for x in r["rows"]:
        val = "-" if x["val"] is None else f"{100 * x['val']:.2f} ± {100 * (x['val_ci95'] or 0):.2f}"
        gain = "-" if x["gain"] is None else f"{100 * x['gain']:+.2f} ± {100 * (x['gain_ci95'] or 0):.2f}"
        test = "-" if x["test"] is None else f"{100 * x['test']:.2f}"
        table.add_row(str(x["seed"]), x["scheduler"], str(x["trials"]), str(x["epochs"]), str(x["confirm_epochs"]),
                      val, test, gain + (" (published won)" if x["published_best"] else ""), f"{x['wall_s']:.0f}")
    console.print(table)
    rho = r["spearman"]
    console.print(f"Spearman rank correlation, shortest budget vs full recipe, {len(r['pairs'])} configurations: "
                  + ("undefined (fewer than 3 pairs or all tied)" if rho is None else f"{rho:+.2f}"),
                  highlight=False)
    console.print("pairs (shortest budget, full recipe): " + ", ".join(f"({a:.3f}, {b:.3f})" for a, b in r["pairs"]),
                  highlight=False)


@bench_app.command("cluster")
def bench_cluster_cmd(
    cluster_file: Path = typer.Option(Path("cluster.yaml"), "--cluster-file", help="the cluster-launcher file "
                                      "whose node types are simulated (scaled down to this machine)"),
    trials: int = typer.Option(4, help="trials per study"),
    epochs: int = typer.Option(2, help="epochs per trial"),
) -> None:
    """A study on cluster.yaml simulated here (Ray's fake autoscaler): nodes launched, concurrency reached."""
    from ltstudy.experiments.bench_cluster import bench_cluster

    rows = bench_cluster(cluster_file, trials=trials, epochs=epochs)
    table = Table(title=f"bench cluster: {trials} two-worker trials x {epochs} epochs on {cluster_file}, simulated")
    for col in ("cluster", "worker nodes launched", "trials per node", "concurrency (max / reached)", "wall s"):
        table.add_column(col)
    for name, r in rows.items():
        table.add_row(name, str(r["worker_nodes_launched"]), str(r["trials_per_node"]),
                      f"{r['concurrency_max']} / {r['concurrency_reached']}", f"{r['study_wall_s']:.1f}")
    console.print(table)


@bench_app.command("overhead")
def bench_overhead_cmd(
    trials: str | None = typer.Option(None, help="trial counts, comma-separated (default 8,32,96; with "
                                                 "--features 1000)"),
    concurrent: int = typer.Option(2, help="trials at a time (one CPU each)"),
    features: bool = typer.Option(False, "--features", help="the feature-stage case: ce_classifier on cached "
                                  "features, trials of about a second, and the commands run over the study"),
) -> None:
    """What a study spends around its trials, beside plain Ray Tune + OptunaSearch + MLflowLoggerCallback."""
    from ltstudy.experiments.bench_overhead import bench_overhead, bench_overhead_features

    try:
        counts = tuple(int(n) for n in (trials or ("1000" if features else "8,32,96")).split(","))
    except ValueError:
        raise LtstudyError(f"--trials takes numbers like 8,32,96; got {trials!r}") from None
    if min(counts) < 1 or concurrent < 1:
        raise LtstudyError("--trials and --concurrent must be at least 1")
    if features:
        rows, fits = [bench_overhead_features(counts[-1], concurrent)], {}
    else:
        result = bench_overhead(counts, concurrent)
        rows, fits = result["rows"], {"ltstudy": result["ltstudy_fit"], "plain Tune": result["plain_fit"]}
    table = Table(title=f"bench overhead: {'feature' if features else 'image'}-stage trials, {concurrent} at a "
                        "time (process start to exit)")
    for col in ("trials", "trial s", "wall s (ltstudy / plain)", "share used", "overhead per trial, slot-s"):
        table.add_column(col, justify="right")
    for r in rows:
        a, b = r["ltstudy"], r["plain"]
        table.add_row(str(r["trials"]), f"{r['trial_s']:.2f}", f"{a['wall_s']:.1f} / {b['wall_s']:.1f}",
                      f"{a['share']:.2f} / {b['share']:.2f}",
                      f"{a['overhead_per_trial']:.2f} / {b['overhead_per_trial']:.2f}")
    console.print(table)
    for name, fit in fits.items():
        if fit:
            console.print(f"{name}: fixed cost {fit['fixed_slot_s']:.1f} slot-s "
                          f"({fit['fixed_slot_s'] / concurrent:.1f} s of wall), {fit['per_trial_slot_s']:.2f} "
                          "slot-s per trial", highlight=False)
    for what, seconds in rows[0].get("after", {}).items():
        console.print(f"{what}: {seconds:.2f} s", highlight=False)
