"""Commands that train: ``train``, ``compare``, ``methods``, ``datasets show``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ltstudy.cli.common import (
    CONFIG,
    DATA_ROOT,
    DATASET,
    DOWNLOAD,
    IMBALANCE,
    METHOD,
    OVERRIDES,
    TRACKING,
    app,
    console,
    datasets_app,
    metrics_table,
    pct,
    split_metrics,
)
from ltstudy.errors import LtstudyError


def _print_epoch(epochs: int) -> Any:
    def report(m: dict[str, Any], checkpoint: str | None) -> None:
        console.print(
            f"epoch {m['epoch']:>3}/{epochs}  loss {m['train_loss']:.4f}  lr {m['lr']:.4g}  "
            f"val top-1 {pct(m['val_top1'])}  many/med/few {pct(m['val_many'])}/"
            f"{pct(m['val_medium'])}/{pct(m['val_few'])}  ECE {pct(m.get('val_ece'))}  {m['epoch_seconds']:.1f}s"
        )
    return report


@app.command()
def train(
    method: str | None = METHOD,
    dataset: str | None = DATASET,
    imbalance: float | None = IMBALANCE,
    data_root: str | None = DATA_ROOT,
    config: Path | None = CONFIG,
    download: bool | None = DOWNLOAD,
    checkpoint_dir: Path | None = typer.Option(None, help="write a checkpoint after every epoch"),
    resume: bool = typer.Option(False, help="continue from the checkpoint in --checkpoint-dir"),
    save_config: Path | None = typer.Option(None, help="write the resolved config as YAML"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train and evaluate one configuration; ends with a metrics table."""
    import yaml

    from ltstudy.config import check_runnable, load_config, stage_weights
    from ltstudy.train import TrialContext, run_trial

    cfg = load_config(config, overrides or [], method=method, dataset=dataset, imbalance=imbalance,
                      data_root=data_root, download=download)
    if resume and checkpoint_dir is None:
        raise LtstudyError("--resume needs --checkpoint-dir")
    check_runnable(cfg)
    pins = stage_weights(cfg)  # a hub tag: fetched once into the weights cache, then loaded from there
    if pins:
        cfg = cfg.replace(**pins)
    if save_config:
        save_config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t = cfg.train
    weights = f" (weights {t.pretrained})" if t.pretrained else (" (random initialisation)" if t.pretrained_model
                                                                  else "")
    console.print(f"ltstudy train: {t.method} on {t.dataset} (IF {t.imbalance:g}), "
                  f"{t.model}{weights}, {t.epochs} epochs, seed {t.seed}", soft_wrap=True, markup=False)
    ctx = TrialContext(checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                       resume_from=str(checkpoint_dir) if resume else None)
    metrics = run_trial(cfg, _print_epoch(t.epochs), ctx)
    if not metrics:
        console.print("nothing to do: the checkpoint is already at the last epoch")
        return
    console.print(metrics_table({"val": split_metrics(metrics, "val_"),
                                 "test": split_metrics(metrics, "test_")}))


@app.command()
def compare(
    methods: str = typer.Option("ce,ldam_drw,balanced_softmax", help="comma-separated method names"),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
    config: Path | None = CONFIG,
    checkpoint_root: Path | None = typer.Option(None, help="keep each run's checkpoint here"),
    per_method: list[str] | None = typer.Option(
        None, "--set", help="METHOD:KEY=VALUE for one method only ({seed} is replaced)"),
    output: Path | None = typer.Option(None, "-o", help="also write the Markdown table here"),
    figure: Path | None = typer.Option(None, "--figure", help="per-bucket accuracy figure (PNG; default: "
                                       "beside -o, else compare-buckets.png)"),
    experiment: str | None = typer.Option(None, "--experiment", help="MLflow experiment to create "
                                          "(default compare-TIMESTAMP)"),
    tracking_uri: str | None = TRACKING,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train several methods over several seeds with the same settings; mean ± std table and figure.

    Shows run i of N, the epoch and the time left; records everything in MLflow as an experiment of its
    own (a run per method and seed under one parent run holding the table and the figure).
    """
    from datetime import datetime

    from ltstudy.config import load_yaml, parse_overrides
    from ltstudy.experiments.compare import CompareProgress, CompareTracker, markdown, plan_runs
    from ltstudy.experiments.compare import compare as run
    from ltstudy.methods import get_method
    from ltstudy.study.results.plots import bucket_png
    from ltstudy.study.tracking.store import check_reachable, resolve_tracking_uri

    values = {**(load_yaml(config) if config else {}), **parse_overrides(overrides or [])}
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for name in names:
        get_method(name)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise LtstudyError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    extra: dict[str, dict[str, Any]] = {}
    for item in per_method or []:
        name, sep, assignment = item.partition(":")
        if not sep:
            raise LtstudyError(f"--set {item!r} is not of the form METHOD:KEY=VALUE")
        extra.setdefault(name, {}).update(parse_overrides([assignment]))

    configs = plan_runs(names, seed_list, values, extra)  # every bad value fails here, before any run
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    tracker = CompareTracker(uri, experiment or f"compare-{datetime.now():%Y%m%d-%H%M%S}", names, seed_list,
                             values)
    console.print(f"compare: {len(configs)} runs ({', '.join(names)} x seeds {seeds}); MLflow: {tracker.url()}",
                  soft_wrap=True, highlight=False, markup=False)
    progress = CompareProgress(console, configs)
    try:
        rows = run(names, seed_list, values, None, extra, str(checkpoint_root) if checkpoint_root else None,
                   progress=progress, tracker=tracker)
    except BaseException:
        tracker.fail()
        raise
    finally:
        progress.close()
    table = markdown(rows)
    print(table)
    if output:
        output.write_text(table + "\n")
    figure = figure or (output.with_suffix(".png") if output else Path("compare-buckets.png"))
    figure.write_bytes(bucket_png(rows))
    console.print(f"figure: {figure}; MLflow experiment {tracker.name}: {tracker.url()}", soft_wrap=True,
                  highlight=False, markup=False)


@app.command()
def methods(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="show the published recipe of this "
                                       "dataset's family only (cifar10-lt | cifar100-lt | filelist | synthetic)"),
    imbalance: float | None = typer.Option(None, "--imbalance", help="with --dataset: values published for "
                                           "this imbalance factor"),
    method: str | None = typer.Option(None, "--method", "-m", help="one method only"),
) -> None:
    """List the registered methods with their hyperparameters and published recipes per dataset family."""
    from ltstudy.data import FAMILIES, dataset_family
    from ltstudy.methods import get_method, iter_hyperparameters, list_methods

    families = [dataset_family(dataset)] if dataset else list(FAMILIES)
    for name in [method] if method else list_methods():
        spec = get_method(name)
        console.print(f"[bold]{name}[/bold] ({spec.stage}) — {spec.summary}")
        for key, kind, default, desc in iter_hyperparameters(name):
            console.print(f"    {key:<22} {kind:<8} default {default!r:<10} {desc}")
        for family in families:
            recipe = spec.recipe(family)
            values = recipe.resolved(imbalance)
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            console.print(f"    recipe {family} ({FAMILIES[family]}): {shown}")
            console.print(f"        source: {recipe.source}")
            tied = spec.lr_milestones(spec.Params(**{k: v for k, v in values.items() if k in spec.Params.model_fields}))
            if tied and values.get("schedule", "step") == "step":
                console.print(f"        lr milestones follow the phase switch: {tied} of the epochs")


@datasets_app.command("show")
def datasets_show(
    dataset: str | None = DATASET,
    imbalance: float | None = IMBALANCE,
    data_root: str | None = DATA_ROOT,
    method: str | None = typer.Option(None, "--method", "-m", help="include the sets this method carves "
                                                                    "(MetaSAug's meta set)"),
    config: Path | None = CONFIG,
    split: str = typer.Option("train", help="train | val | test"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Print the class counts of a split, head to tail, with the many/medium/few buckets, the realised
    imbalance factor and the classes that gave training images to validation (and carved sets)."""
    from ltstudy.config import load_config, load_data
    from ltstudy.metrics import shot_masks

    if split not in ("train", "val", "test"):
        raise LtstudyError(f"unknown split {split!r}; choose train, val or test")
    cfg = load_config(config, overrides or [], dataset=dataset, imbalance=imbalance, data_root=data_root,
                      method=method)
    t = cfg.train
    data = load_data(cfg)
    labels = getattr(data, split).labels
    counts = torch_bincount(labels, data.num_classes)
    masks = shot_masks(data.class_counts, t.many_threshold, t.few_threshold)
    bucket = {c: g for g, m in masks.items() for c in m.nonzero().flatten().tolist()}
    order = sorted(range(data.num_classes), key=lambda c: (-int(data.class_counts[c]), c))
    gave = data.gave_up()
    table = Table(title=f"{data.name} {split} ({len(labels)} images)")
    columns = ["class", "name", "images", "bucket"]
    if split == "train" and data.target_counts is not None:
        columns[3:3] = ["standard n_i"]
    for col in columns:
        table.add_column(col)
    for c in order:
        row = [str(c), data.class_names[c], str(counts[c]), bucket[c]]
        if "standard n_i" in columns:
            row[3:3] = [str(data.target_counts[c]) + (f" (gave {gave[c]})" if c in gave else "")]
        table.add_row(*row)
    console.print(table)
    summary = ", ".join(f"{g} {int(m.sum())} classes (n {'>' if g == 'many' else '<' if g == 'few' else 'in'} "
                        f"{t.many_threshold if g == 'many' else t.few_threshold if g == 'few' else f'[{t.few_threshold}, {t.many_threshold}]'})"
                        for g, m in masks.items())
    console.print(f"buckets by training count: {summary}")
    n = data.class_counts
    console.print(f"imbalance: IF {data.realised_imbalance:.4g} as realised ({int(n.max())} / {int(n.min())} "
                  f"training images)" + (f", IF {t.imbalance:g} requested" if data.target_counts else ""))
    for line in held_out_lines(data):
        console.print(line)


def torch_bincount(labels: Any, num_classes: int) -> list[int]:
    return [int(v) for v in labels.bincount(minlength=num_classes).tolist()]


def held_out_lines(data: Any) -> list[str]:
    """Where validation and the carved sets come from, and which classes paid for them with training images."""
    sets = ", ".join(f"{name} {n}" for name, n in data.held.items())
    if data.target_counts is None:  # file lists: the lists fix train / val / test
        if not data.carved:
            return ["held out: the split lists as given (validation = the val list)"]
        return [f"held out per class from the val list: {sets}; validation is the rest of the val list "
                f"({len(data.val)} images)"]
    gave = data.gave_up()
    lines = [f"held out per class ({sets}) from the images the long-tailed profile leaves out"]
    if gave:
        lines.append("classes that gave training images to them (could not spare them): " + ", ".join(
            f"{c} ({data.target_counts[c]} -> {data.target_counts[c] - k}, gave {k})" for c, k in sorted(gave.items())))
    else:
        lines.append("no class gave training images to them: the training split has the standard counts")
    return lines
