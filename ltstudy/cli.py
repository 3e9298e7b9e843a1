"""ltstudy: long-tailed recognition methods on one trainer; hyperparameter studies on Ray Tune + Optuna,
tracked in MLflow.

Expected failures (bad flags, files or data) print one line and exit with code 2.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import Abort, TyperException

from ltstudy.errors import LtstudyError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help=__doc__)
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect long-tailed datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput and memory benchmarks.")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")

console = Console(highlight=False)
OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...", help="override any config key")
METHOD = typer.Option(None, "--method", "-m", help="method name (see `ltstudy methods`)")
DATASET = typer.Option(None, "--dataset", "-d", help="cifar10-lt | cifar100-lt | filelist | synthetic")
IMBALANCE = typer.Option(None, "--imbalance", help="imbalance factor n_max/n_min (>= 1)")
DATA_ROOT = typer.Option(None, "--data-root", help="folder holding the dataset")
CONFIG = typer.Option(None, "--config", "-c", help="YAML config file")
DOWNLOAD = typer.Option(None, "--download/--no-download", help="fetch missing CIFAR data")


def pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def metrics_table(rows: dict[str, dict[str, float]], title: str = "metrics (%)") -> Table:
    table = Table(title=title)
    for col in ("split", "top-1", "many", "medium", "few", "loss"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, m in rows.items():
        table.add_row(split, pct(m.get("top1")), pct(m.get("many")), pct(m.get("medium")),
                      pct(m.get("few")), f"{m.get('loss', math.nan):.4f}")
    return table


def split_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and
            not k.endswith("per_class")}


def _print_epoch(epochs: int) -> Any:
    def report(m: dict[str, Any], checkpoint: str | None) -> None:
        console.print(
            f"epoch {m['epoch']:>3}/{epochs}  loss {m['train_loss']:.4f}  lr {m['lr']:.4g}  "
            f"val top-1 {pct(m['val_top1'])}  many/med/few {pct(m['val_many'])}/"
            f"{pct(m['val_medium'])}/{pct(m['val_few'])}  {m['epoch_seconds']:.1f}s"
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

    from ltstudy.config import load_config
    from ltstudy.train import run_trial

    cfg = load_config(config, overrides or [], method=method, dataset=dataset, imbalance=imbalance,
                      data_root=data_root, download=download)
    if resume and checkpoint_dir is None:
        raise LtstudyError("--resume needs --checkpoint-dir")
    if save_config:
        save_config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    t = cfg.train
    console.print(f"ltstudy train: {t.method} on {t.dataset} (IF {t.imbalance:g}), "
                  f"{t.model}, {t.epochs} epochs, seed {t.seed}")
    from ltstudy.train import TrialContext

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
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train several methods over several seeds with the same settings; mean ± std table."""
    from ltstudy.compare import compare as run
    from ltstudy.compare import markdown
    from ltstudy.config import load_yaml, parse_overrides
    from ltstudy.methods import get_method

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

    def progress(method: str, seed: int, m: dict[str, Any]) -> None:
        console.print(f"{method} seed {seed}: val top-1 {pct(m['val_top1'])}  test top-1 "
                      f"{pct(m['test_top1'])}  many/med/few {pct(m['test_many'])}/"
                      f"{pct(m['test_medium'])}/{pct(m['test_few'])}")

    rows = run(names, seed_list, values, progress, extra,
               str(checkpoint_root) if checkpoint_root else None)
    table = markdown(rows)
    print(table)
    if output:
        output.write_text(table + "\n")


@app.command()
def methods() -> None:
    """List the registered methods with their hyperparameters and published defaults."""
    from ltstudy.methods import get_method, iter_hyperparameters, list_methods

    for name in list_methods():
        spec = get_method(name)
        console.print(f"[bold]{name}[/bold] ({spec.stage}) — {spec.summary}")
        for key, kind, default, desc in iter_hyperparameters(name):
            console.print(f"    {key:<22} {kind:<8} default {default!r:<10} {desc}")
        if spec.train_defaults:
            recipe = ", ".join(f"{k}={v}" for k, v in spec.train_defaults.items())
            console.print(f"    recipe: {recipe}")


@datasets_app.command("show")
def datasets_show(
    dataset: str | None = DATASET,
    imbalance: float | None = IMBALANCE,
    data_root: str | None = DATA_ROOT,
    config: Path | None = CONFIG,
    split: str = typer.Option("train", help="train | val | test"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Print the class counts of a split, head to tail, with the many/medium/few buckets."""
    from ltstudy.config import load_config
    from ltstudy.metrics import shot_masks
    from ltstudy.train import load_data

    if split not in ("train", "val", "test"):
        raise LtstudyError(f"unknown split {split!r}; choose train, val or test")
    cfg = load_config(config, overrides or [], dataset=dataset, imbalance=imbalance,
                      data_root=data_root)
    t = cfg.train
    data = load_data(cfg)
    labels = getattr(data, split).labels
    counts = [int((labels == c).sum()) for c in range(data.num_classes)]
    masks = shot_masks(data.class_counts, t.many_threshold, t.few_threshold)
    bucket = {c: g for g, m in masks.items() for c in m.nonzero().flatten().tolist()}
    order = sorted(range(data.num_classes), key=lambda c: -int(data.class_counts[c]))
    table = Table(title=f"{data.name} {split} (IF {t.imbalance:g}, {len(labels)} images)")
    for col in ("class", "name", "images", "bucket"):
        table.add_column(col)
    for c in order:
        table.add_row(str(c), data.class_names[c], str(counts[c]), bucket[c])
    console.print(table)
    summary = ", ".join(f"{g} {int(m.sum())} classes (n {'>' if g == 'many' else '<' if g == 'few' else 'in'} "
                        f"{t.many_threshold if g == 'many' else t.few_threshold if g == 'few' else f'[{t.few_threshold}, {t.many_threshold}]'})"
                        for g, m in masks.items())
    console.print(f"buckets by training count: {summary}")


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
    from ltstudy.bench import bench_train as run

    result = run(method=method, model=model, batch_size=batch_size, steps=steps, repeats=repeats,
                 device=device)
    table = Table(title=f"bench train: {method} / {model}, batch {batch_size} on {result['device']}")
    for col in ("train img/s", "eval img/s", "peak memory MiB"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['train_images_per_s']:.0f}", f"{result['eval_images_per_s']:.0f}",
                  f"{result['peak_memory_mib']:.0f}")
    console.print(table)


# ------------------------------------------------------------------------------------------------
# feature cache: `ltstudy features extract`, `ltstudy bench features`

features_app = typer.Typer(no_args_is_help=True, help="The backbone feature cache (Parquet).")
app.add_typer(features_app, name="features")


@features_app.command("extract")
def features_extract(
    checkpoint: str = typer.Option(..., "--checkpoint",
                                   help="backbone checkpoint.pt, its folder, or a trial's MLflow run id"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="for a run id"),
    storage: str | None = typer.Option(None, "--storage", help="cache root URI (default ./ltstudy_results)"),
    fmaps: bool = typer.Option(False, "--fmaps/--no-fmaps", help="also store last-stage train maps (FSA)"),
    augmented_views: int = typer.Option(0, "--augmented-views", help="extra augmented train passes"),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help="S3 endpoint override"),
    device: str = typer.Option("auto", "--device"),
    force: bool = typer.Option(False, "--force", help="re-extract even when a valid cache exists"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Extract train/val/test features of a backbone checkpoint into the cache; prints the key."""
    from ltstudy.config import parse_overrides
    from ltstudy.features.extract import extract_features
    from ltstudy.study.tracking import resolve_backbone

    r = extract_features(resolve_backbone(checkpoint, tracking_uri), storage=storage, overrides=parse_overrides(overrides or []),
                         fmaps=fmaps, augmented_views=augmented_views, device=device,
                         endpoint_override=endpoint_url, force=force)
    rows = ", ".join(f"{k} {v}" for k, v in r.rows.items())
    console.print(f"feature cache {r.key} ({'reused' if r.reused else f'extracted in {r.seconds:.1f}s'})")
    console.print(f"rows: {rows}; dim {r.manifest.get('feature_dim')}; maps {r.manifest.get('fmap_shape')}")
    console.print(f"location: {r.location}")
    console.print(f"use it with: feature_key={r.key} feature_storage={r.storage.uri}")


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
    from ltstudy.bench_features import bench_features

    r = bench_features(checkpoint=str(checkpoint) if checkpoint else None, storage=storage, method=method,
                       repeats=repeats, device=device, overrides=overrides or [])
    table = Table(title=f"bench features on {r['device']} ({r['rows']} rows, {r['megabytes']:.1f} MB)")
    for col in ("read MB/s (median)", f"{method} trial s", "recompute features s", "extract+write s"):
        table.add_column(col, justify="right")
    table.add_row(f"{r['read_mb_per_s']:.0f}", f"{r['trial_seconds']:.2f}", f"{r['recompute_seconds']:.2f}",
                  f"{r['extract_seconds']:.2f}")
    console.print(table)


# ------------------------------------------------------------------------------------------ studies
# Thin wrappers over ltstudy.study (Ray, Optuna and MLflow are imported only when a command runs).
best_config_app = typer.Typer(no_args_is_help=True, help="Export the best configuration of a study.")
studies_app = typer.Typer(no_args_is_help=True, help="Studies in a tracking store.")
app.add_typer(best_config_app, name="best-config")
app.add_typer(studies_app, name="studies")
TRACKING = typer.Option(None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<cwd>/mlflow.db)")


@app.command("validate-space")
def validate_space(
    file: Path = typer.Argument(..., help="search-space YAML"),
    method: str | None = typer.Option(None, "--method", "-m", help="expected method"),
) -> None:
    """Check a search-space file against the method's declared hyperparameters."""
    from ltstudy.study.space import load_space

    space = load_space(file, method)
    console.print(f"ok: {file} — {space.method}, {space.mode} {space.metric}, tuned "
                  f"{', '.join(space.tuned_names) or '(none)'}; first trial {space.published_point()}")


def _echo_trial(trial_id: str, outcome: str, last: dict[str, Any]) -> None:
    value = last.get("val_top1")
    console.print(f"trial {trial_id}: {outcome} after epoch {last.get('epoch', 0)}"
                  + (f", val top-1 {pct(value)}" if value is not None else "")
                  + (f" ({last['failure']})" if last.get("failure") else ""))


@app.command()
def tune(
    method: str = typer.Option(..., "--method", "-m", help="method name (see `ltstudy methods`)"),
    space: Path | None = typer.Option(None, "--space", help="search-space file "
                                         "(default search_spaces/METHOD.yaml)"),
    dataset: str | None = DATASET,
    imbalance: float | None = IMBALANCE,
    data_root: str | None = DATA_ROOT,
    num_trials: int = typer.Option(8, "--num-trials", "-n"),
    max_concurrent: int | None = typer.Option(None, help="concurrent trials (default: what fits)"),
    sampler: str = typer.Option("tpe", help="tpe | random | cmaes | gp | qmc"),
    scheduler: str = typer.Option("asha", help="asha (on the per-epoch objective) | none"),
    workers: int = typer.Option(1, help="workers per trial (>1: Ray Train DDP)"),
    cpus_per_worker: float = typer.Option(1.0),
    gpus_per_worker: float = typer.Option(0.0, help="fractions share a GPU, e.g. 0.5"),
    retries: int = typer.Option(1, help="restarts from the last checkpoint after a killed worker"),
    storage: str | None = typer.Option(None, help="results/checkpoints URI or shared folder "
                                          "(default ./ltstudy_results)"),
    tracking_uri: str | None = TRACKING,
    study_name: str | None = typer.Option(None, help="default METHOD-DATASET-TIMESTAMP"),
    address: str | None = typer.Option(None, help="existing Ray cluster (e.g. auto)"),
    resume: bool = typer.Option(False, help="continue an interrupted study"),
    seed: int = typer.Option(0, help="sampler seed"),
    grace_period: int = typer.Option(1, help="ASHA: epochs before a trial can be stopped"),
    backbone: str | None = typer.Option(
        None, help="feature-stage methods: backbone checkpoint, or the MLflow run id of a trial"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Tune METHOD with Ray Tune + Optuna (+ ASHA), recording every trial in MLflow."""
    from ltstudy.config import parse_overrides
    from ltstudy.study.tune import StudyOptions, run_study

    fixed = parse_overrides(overrides or [])
    flags = (("dataset", dataset), ("imbalance", imbalance), ("data_root", data_root))
    fixed.update({k: v for k, v in flags if v is not None})
    opts = StudyOptions(method=method, space_path=str(space) if space else None, num_trials=num_trials,
                        max_concurrent=max_concurrent, sampler=sampler, scheduler=scheduler,
                        workers=workers, cpus_per_worker=cpus_per_worker,
                        gpus_per_worker=gpus_per_worker, storage=storage, tracking_uri=tracking_uri,
                        study_name=study_name, address=address, resume=resume, seed=seed,
                        overrides=fixed, retries=retries, grace_period=grace_period,
                        backbone=backbone)
    summary = run_study(opts, echo=_echo_trial)
    _print_summary(summary)


def _print_summary(s: Any) -> None:
    table = Table(title=f"study {s.study}: best by {s.mode} {s.metric}")
    table.add_column("", style="bold")
    table.add_column("value")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))
    table.add_row("trials", counts or "none")
    if s.best is None:
        table.add_row("best", "no trial finished")
    else:
        b = s.best
        table.add_row("best trial", f"{b['trial_id']} (run {b['run_id']})")
        for name in s.tuned:
            if name in b["params"]:
                table.add_row(f"  {name}", b["params"][name])
        m = b["metrics"]
        for split in ("val", "test"):
            table.add_row(f"{split} top-1 / many / medium / few (%)",
                          " / ".join(pct(m.get(f"{split}_{k}")) for k in ("top1", "many", "medium", "few")))
    table.add_row("results", s.experiment_path)
    table.add_row("tracking", f"{s.tracking_uri} (study run {s.parent_run_id})")
    ui = (f"open {s.tracking_uri}" if s.tracking_uri.startswith("http")
          else f"mlflow ui --backend-store-uri {s.tracking_uri}")
    table.add_row("MLflow UI", ui)
    table.add_row("export", f"ltstudy best-config export --study {s.study} -o best.yaml")
    table.add_row("wall time", f"{s.wall_s:.0f} s")
    console.print(table)


@best_config_app.command("export")
def best_config_export(
    study: str = typer.Option(..., "--study", help="study name"),
    output: Path | None = typer.Option(None, "--output", "-o", help="file (default: stdout)"),
    fmt: str = typer.Option("yaml", "--format", help="yaml | json"),
    tracking_uri: str | None = TRACKING,
) -> None:
    """Write the best trial's config (with provenance) for `ltstudy train --config`."""
    import json

    import yaml

    from ltstudy.study.tracking import check_reachable, export_best, resolve_tracking_uri

    if fmt not in ("yaml", "json"):
        raise LtstudyError(f"--format must be yaml or json, not {fmt!r}")
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    config = export_best(uri, study)
    text = json.dumps(config, indent=2) if fmt == "json" else yaml.safe_dump(config, sort_keys=False)
    if output is None:
        print(text)
    else:
        output.write_text(text)
        console.print(f"wrote {output} (trial {config['provenance']['trial_id']}, "
                      f"run {config['provenance']['run_id']})")


@studies_app.command("list")
def studies_list(tracking_uri: str | None = TRACKING) -> None:
    """The studies in a tracking store with their best objective values."""
    from ltstudy.study.tracking import check_reachable, list_studies, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    table = Table(title=f"studies in {uri}")
    for col in ("study", "method", "objective", "trials", "best", "best trial", "status"):
        table.add_column(col)
    for r in list_studies(uri):
        best = "–" if r["best"] is None else f"{r['best']:.4f}"
        table.add_row(r["study"], r["method"], f"{r['mode']} {r['metric']}", str(r["trials"]), best,
                      r["best_trial"] or "–", r["status"])
    console.print(table)


@bench_app.command("study")
def bench_study_cmd(
    trials: int = typer.Option(3, help="trials per configuration"),
    epochs: int = typer.Option(2),
) -> None:
    """Per-trial overhead (trial wall time minus time in run_trial), 1 and 2 workers; trials/hour."""
    from ltstudy.study.bench import bench_study

    rows = bench_study(trials=trials, epochs=epochs)
    table = Table(title="bench study (medians)")
    for col in ("workers", "trials", "trial wall s", "in run_trial s", "overhead s", "trials/hour"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["workers"]), str(r["trials"]), f"{r['wall_s']:.1f}", f"{r['run_trial_s']:.1f}",
                      f"{r['overhead_s']:.1f}", f"{r['trials_per_hour']:.0f}")
    console.print(table)
# ---------------------------------------------------------------------------------- end of studies


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning expected failures into one line and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="ltstudy", standalone_mode=False)
    except LtstudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TyperException as exc:  # usage errors (typer vendors click since 0.29)
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
            print(exc.ctx.get_help())
            sys.exit(0)
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
