"""Study commands: ``tune``, ``validate-space``, ``best-config export``, ``studies list``.

Thin wrappers over :mod:`ltstudy.study`; Ray, Optuna and MLflow are imported only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ltstudy.cli.common import (
    DATA_ROOT,
    DATASET,
    IMBALANCE,
    OVERRIDES,
    TRACKING,
    app,
    best_config_app,
    console,
    pct,
    studies_app,
)
from ltstudy.errors import LtstudyError
from ltstudy.study.options import DEFAULTS
from ltstudy.study.storage import DEFAULT_STORAGE


@app.command("validate-space")
def validate_space(
    file: Path = typer.Argument(..., help="search-space YAML"),
    method: str | None = typer.Option(None, "--method", "-m", help="expected method"),
) -> None:
    """Check a search-space file against the method's declared hyperparameters."""
    from ltstudy.study.search.space import load_space

    space = load_space(file, method)
    objective = ", ".join(f"{mode} {m}" for m, mode in zip(space.metrics, space.modes, strict=True))
    console.print(f"ok: {file} — {space.method}, {objective}, tuned "
                  f"{', '.join(space.tuned_names) or '(none)'}; first trial {space.published_point()}")


@app.command()
def tune(
    method: str | None = typer.Option(None, "--method", "-m", help="method name (see `ltstudy methods`)"),
    space: Path | None = typer.Option(None, "--space", help="search-space file "
                                         "(default search_spaces/METHOD.yaml)"),
    dataset: str | None = DATASET,
    imbalance: float | None = IMBALANCE,
    data_root: str | None = DATA_ROOT,
    num_trials: int | None = typer.Option(None, "--num-trials", "-n", help=f"trials (default {DEFAULTS.num_trials}; "
                                          "halving: configurations at the shortest budget)"),
    max_concurrent: int | None = typer.Option(None, help="concurrent trials (default: what the cluster "
                                              "can hold at its largest; may change on --resume)"),
    sampler: str | None = typer.Option(None, help=f"tpe | random | cmaes | gp | qmc (default {DEFAULTS.sampler})"),
    scheduler: str | None = typer.Option(None, help="asha (early stopping on the per-epoch objective) | "
                                                    "halving (successive halving, eta 3: every configuration "
                                                    "runs the whole recipe compressed to epochs/3^K, the best "
                                                    "third again at 3x the epochs, up to the full recipe) | "
                                                    f"none (default {DEFAULTS.scheduler})"),
    grace_period: str | None = typer.Option(
        None, help=f"ASHA's first rung, in epochs (default {DEFAULTS.grace_period}: after the last phase of "
                 "the schedule)"),
    reduction_factor: float | None = typer.Option(None, help=f"ASHA's reduction factor (default {DEFAULTS.reduction_factor:g})"),
    workers: int | None = typer.Option(None, help=f"workers per trial (>1: Ray Train DDP; default {DEFAULTS.workers})"),
    cpus_per_worker: float | None = typer.Option(None, help=f"default {DEFAULTS.cpus_per_worker:g}"),
    gpus_per_worker: float | None = typer.Option(None, help=f"fractions share a GPU, e.g. 0.5; default {DEFAULTS.gpus_per_worker:g}"),
    retries: int | None = typer.Option(None, help=f"restarts after a lost worker or node (default {DEFAULTS.retries})"),
    seed: int | None = typer.Option(None, help="sampler seed (default: derived from the study name)"),
    time_budget: str | None = typer.Option(None, help="stop starting trials after this long (90m, 2h)"),
    confirm: int = typer.Option(DEFAULTS.confirm, help="re-run the top K configurations over more seeds before export"),
    confirm_seeds: int = typer.Option(DEFAULTS.confirm_seeds, help="seeds per confirmed configuration"),
    checkpoint_every: int = typer.Option(DEFAULTS.checkpoint_every, help="epochs between trial checkpoints "
                                         "(also written at the end and at ASHA's rungs)"),
    storage: str | None = typer.Option(None, help="results/checkpoints URI or shared folder "
                                          f"(default ./{DEFAULT_STORAGE})"),
    tracking_uri: str | None = TRACKING,
    study_name: str | None = typer.Option(None, help="default METHOD-DATASET-TIMESTAMP"),
    address: str | None = typer.Option(None, help="existing Ray cluster (e.g. auto)"),
    resume: bool = typer.Option(False, help="continue an interrupted study (with its saved options)"),
    backbone: str | None = typer.Option(
        None, help="feature-stage methods: backbone checkpoint, or the MLflow run id of a trial"),
    download: bool = typer.Option(False, "--download", help="fetch missing CIFAR data once, before any "
                                  "trial (into --data-root, default STORAGE/data)"),
    optuna_storage: str | None = typer.Option(
        None, help="Optuna storage of every study: journal file or RDB URL "
                   "(default STORAGE/optuna.journal; required with s3:// storage)"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="-v: also Ray's trial tables and the workers' logs; -vv: Ray's INFO logs"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Tune METHOD with Ray Tune + Optuna (+ ASHA), recording every trial in MLflow.

    Prints a line when a trial starts and when it ends (a live footer with counts, the best value and
    the time left on a terminal), then a summary of the best trial.
    """
    from ltstudy.config import parse_overrides
    from ltstudy.errors import StudyFailed
    from ltstudy.study.options import StudyOptions, parse_duration
    from ltstudy.study.run import run_study

    fixed = parse_overrides(overrides or [])
    flags = (("dataset", dataset), ("imbalance", imbalance), ("data_root", data_root))
    fixed.update({k: v for k, v in flags if v is not None})
    if download:
        fixed["download"] = True
    if method is None and not resume:
        raise LtstudyError("missing option '--method' (the method to tune; see `ltstudy methods`)")
    given = {"method": method, "space_path": str(space) if space else None, "num_trials": num_trials,
             "sampler": sampler, "scheduler": scheduler, "workers": workers,
             "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker, "retries": retries,
             "seed": seed, "grace_period": grace_period, "reduction_factor": reduction_factor,
             "backbone": backbone, "optuna_storage": optuna_storage, "fixed": fixed or None}
    given = {k: v for k, v in given.items() if v is not None}
    opts = StudyOptions(**{"method": "", **given}, checkpoint_every=checkpoint_every,
                        max_concurrent=max_concurrent, storage=storage, tracking_uri=tracking_uri,
                        study_name=study_name, address=address, resume=resume,
                        time_budget=parse_duration(time_budget), confirm=confirm, confirm_seeds=confirm_seeds,
                        verbose=verbose, given=frozenset(given))
    summary = run_study(opts, echo=_echo_confirmation, say=lambda line: console.print(f"warning: {line}"),
                        console=console)
    _print_summary(summary)
    if summary.failure():
        raise StudyFailed(summary.failure())


def _echo_confirmation(trial_id: str, outcome: str, last: dict[str, Any]) -> None:
    """One line per confirmation run (the study's own trials are on the progress board)."""
    value = last.get("val_top1")
    console.print(f"confirmation {trial_id}: {outcome} after epoch {last.get('epoch', 0)}"
                  + (f", val top-1 {pct(value)}" if value is not None else "")
                  + (f" ({last['failure']})" if last.get("failure") else ""), highlight=False)


def _print_summary(s: Any) -> None:
    objective = ", ".join(f"{mode} {m}" for m, mode in zip(s.metrics, s.modes, strict=True))
    table = Table(title=f"study {s.study}: {objective}")
    table.add_column("", style="bold")
    table.add_column("value")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))
    table.add_row("trials", counts or "none")
    if len(s.metrics) > 1:
        table.add_row("Pareto front", f"{len(s.front)} trials (best-config export --pick N chooses one)")
        for n, t in enumerate(s.front):
            values = ", ".join(f"{m} {pct(t['metrics'].get(m))}" for m in s.metrics)
            table.add_row(f"  {n}: {t['trial_id']}", values)
    elif s.best is None:
        table.add_row("best", "no trial finished")
    else:
        b = s.best
        number = f"{b['number']} (Tune {b['trial_id']}, " if b.get("number") is not None else f"{b['trial_id']} ("
        table.add_row("best trial", f"{number}run {b['run_id']})"
                      + (" — the published configuration" if b.get("published") else ""))
        active = b.get("tuned") or {n: b["params"][n] for n in s.tuned if n in b["params"]}
        for name, value in active.items():  # only the parameters the best trial used
            table.add_row(f"  {name}", value)
        m = b["metrics"]
        for split in ("val", "test"):
            table.add_row(f"{split} top-1 / many / medium / few (%)",
                          " / ".join(pct(m.get(f"{split}_{k}")) for k in ("top1", "many", "medium", "few")))
        if s.gain:
            table.add_row("gain over published", ", ".join(f"{k} {100 * v:+.2f}" for k, v in s.gain.items())
                          + " (points; test reported only)")
    if s.confirmed and s.best is not None:
        table.add_row("selected by", f"confirmation over seeds {s.confirmed[0]['seeds']} (mean, 95 % t-interval; "
                                     "diff: paired, against the published trial)")
    for row in s.confirmed[:5]:
        table.add_row(f"confirmed {row['trial_id']}", _confirmed_cell(s.metric, row))
    table.add_row("results", s.experiment_path)
    table.add_row("tracking", f"{s.tracking_uri} (study run {s.parent_run_id})")
    ui = (f"open {s.tracking_uri}" if s.tracking_uri.startswith("http")
          else f"mlflow ui --backend-store-uri {s.tracking_uri}")
    table.add_row("MLflow UI", ui)
    table.add_row("figures", f"ltstudy report {s.study} (HTML, and the plots onto the study run)")
    table.add_row("export", f"ltstudy best-config export --study {s.study} -o best.yaml"
                  + (" --pick 0" if len(s.metrics) > 1 else ""))
    table.add_row("wall time", f"{s.wall_s:.0f} s")
    console.print(table)
    for note in s.notes:
        console.print(f"note: {note}")


def _confirmed_cell(metric: str, row: dict[str, Any]) -> str:
    """``val_top1 71.20% ± 1.10 (diff +2.30 ± 0.90)``: the mean, its 95 % t-interval, the paired difference."""
    def pm(value: float) -> str:
        return "n/a" if value != value else f"{100 * value:.2f}"

    text = f"{metric} {pct(row['mean'])} ± {pm(row.get('ci95', float('nan')))}"
    if "diff" in row:
        text += f" (diff {100 * row['diff']:+.2f} ± {pm(row['diff_ci95'])})"
    return text + f", {len(row['seeds'])} seeds"


@app.command()
def confirm(
    study: str = typer.Argument(..., help="study name"),
    top: int = typer.Option(3, help="configurations to confirm (best first)"),
    seeds: int = typer.Option(3, help="new seeds per configuration"),
    tracking_uri: str | None = TRACKING,
    address: str | None = typer.Option(None, help="existing Ray cluster (e.g. auto)"),
    max_concurrent: int | None = typer.Option(None, help="concurrent trials (default: what fits)"),
) -> None:
    """Re-run a study's top configurations over more seeds; export then uses the confirmed ranking."""
    from ltstudy.errors import StudyFailed
    from ltstudy.study.confirm import confirm_study
    from ltstudy.study.tracking.store import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri, existing=True)
    result = confirm_study(study, top, seeds, uri, address, max_concurrent, echo=_echo_confirmation)
    table = Table(title=f"study {study}: confirmed ranking by mean {result['metric']} ({result['mode']})")
    for col in ("trial", "mean ± 95 % t-interval, paired diff vs published (points)", "seeds"):
        table.add_column(col)
    for row in result["ranking"]:
        table.add_row(row["trial_id"], _confirmed_cell(result["metric"], row), str(row["seeds"]))
    console.print(table)
    if not result["ranking"]:
        raise StudyFailed(f"no confirmation run of study {study} finished")


@best_config_app.command("export")
def best_config_export(
    study: str = typer.Option(..., "--study", help="study name"),
    output: Path | None = typer.Option(None, "--output", "-o", help="file (default: stdout)"),
    fmt: str = typer.Option("yaml", "--format", help="yaml | json"),
    pick: str | None = typer.Option(None, "--pick", help="multi-objective studies: the Pareto point N, "
                                                          "or 'max METRIC where METRIC >= X'"),
    tracking_uri: str | None = TRACKING,
) -> None:
    """Write the recommended config (confirmed winner, best trial or picked Pareto point) with provenance."""
    import json

    import yaml

    from ltstudy.study.results.export import export_best
    from ltstudy.study.tracking.store import check_reachable, resolve_tracking_uri

    if fmt not in ("yaml", "json"):
        raise LtstudyError(f"--format must be yaml or json, not {fmt!r}")
    if output is not None and not output.parent.is_dir():
        raise LtstudyError(f"--output {output}: folder {output.parent} does not exist")
    if output is not None and output.is_dir():
        raise LtstudyError(f"--output {output} is a folder; give a file name")
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri, existing=True)
    config = export_best(uri, study, pick)
    text = json.dumps(config, indent=2) if fmt == "json" else yaml.safe_dump(config, sort_keys=False)
    if output is None:
        print(text)
    else:
        output.write_text(text)
        console.print(f"wrote {output} (trial {config['provenance']['trial_id']}, "
                      f"run {config['provenance']['run_id']})")


def _store(tracking_uri: str | None) -> str:
    from ltstudy.study.tracking.store import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri, existing=True)
    return uri


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


def _duration(seconds: float) -> str:
    from ltstudy.study.progress import fmt_duration

    return "–" if seconds != seconds else fmt_duration(seconds)


@studies_app.command("list")
def studies_list(tracking_uri: str | None = TRACKING) -> None:
    """The studies in a tracking store: trials by status, data, search, dates, best value, resumability."""
    from ltstudy.study.results.catalog import list_infos

    uri = _store(tracking_uri)
    table = Table(title=f"studies in {uri}")
    for col in ("study", "method", "dataset", "objective", "search", "trials", "best", "best trial", "start",
                "duration", "status", "resumable"):
        table.add_column(col)
    for i in list_infos(uri):
        best = "–" if i.best is None else (
            f"{i.best['confirmed']['mean']:.4f} (confirmed mean)" if i.best.get("confirmed")
            else f"{i.best['metrics'].get(i.metric, float('nan')):.4f}")
        number = "–" if i.best is None else str(i.best["number"] if i.best["number"] is not None
                                                 else i.best["trial_id"])
        table.add_row(i.study, i.method, i.dataset, f"{i.mode} {i.metric}", f"{i.sampler} + {i.scheduler}",
                      f"{_counts(i.counts)} / {i.num_trials}", best, number, i.start, _duration(i.duration_s),
                      i.status, "yes" if i.resumable else "no")
    console.print(table)


@studies_app.command("show")
def studies_show(
    study: str = typer.Argument(..., help="study name"),
    fmt: str = typer.Option("table", "--format", help="table | csv | parquet | json"),
    output: Path | None = typer.Option(None, "--output", "-o", help="file (default: stdout; parquet needs it)"),
    tracking_uri: str | None = TRACKING,
) -> None:
    """One study: its trials (tuned values, objective, status, epochs, node, wall time) and its header."""
    from ltstudy.study.results.catalog import frame_json, study_info, trials_frame

    if fmt not in ("table", "csv", "parquet", "json"):
        raise LtstudyError(f"--format must be table, csv, parquet or json, not {fmt!r}")
    if fmt == "parquet" and output is None:
        raise LtstudyError("--format parquet writes a file: pass -o FILE.parquet")
    info = study_info(_store(tracking_uri), study)
    frame = trials_frame(info.trials, info.metric)
    if fmt == "table":
        _print_show(info, frame)
        return
    if fmt == "parquet":
        frame.to_parquet(output, index=False)
        console.print(f"wrote {output} ({len(frame)} trials)")
        return
    text = frame.to_csv(index=False) if fmt == "csv" else frame_json(info, frame) + "\n"
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
        console.print(f"wrote {output} ({len(frame)} trials)")


def _print_show(info: Any, frame: Any) -> None:
    head = Table(title=f"study {info.study}", show_header=False)
    head.add_column("", style="bold")
    head.add_column("")
    for key, value in (("method", info.method), ("objective", f"{info.mode} {info.metric}"),
                       ("dataset", info.dataset), ("search", f"sampler {info.sampler}, scheduler {info.scheduler}"),
                       ("trials", f"{_counts(info.counts)} (of {info.num_trials})"), ("start", info.start),
                       ("duration", f"{_duration(info.duration_s)} ({info.status})"),
                       ("resumable", f"{'yes' if info.resumable else 'no'}: {info.resume_note}"),
                       ("storage", info.storage), ("Optuna", info.optuna_storage)):
        head.add_row(key, str(value))
    console.print(head)
    table = Table()
    for col in frame.columns:
        table.add_column(str(col), justify="right" if frame[col].dtype.kind in "iufc" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*("–" if v is None or v != v else f"{v:.4g}" if isinstance(v, float) else str(v)
                        for v in row))
    console.print(table)


@studies_app.command("delete")
def studies_delete(
    study: str = typer.Argument(..., help="study name"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    tracking_uri: str | None = TRACKING,
) -> None:
    """Remove a study's MLflow experiment, Optuna study and storage folder (after a confirmation)."""
    from ltstudy.study.results.catalog import delete_study, deletion_plan, study_info

    uri = _store(tracking_uri)
    info = study_info(uri, study)
    console.print(f"study {study} ({_counts(info.counts)}; run {info.status}) will be removed:")
    for line in deletion_plan(info):
        console.print(f"  {line}", soft_wrap=True)
    if not yes and not typer.confirm("Delete it?", default=False):
        console.print("nothing deleted")
        raise typer.Exit(1)
    for line in delete_study(uri, info):
        console.print(f"removed {line}", soft_wrap=True)


@app.command()
def report(
    study: str = typer.Argument(..., help="study name"),
    output: Path | None = typer.Option(None, "--output", "-o", help="HTML file (default STUDY-report.html)"),
    log: bool = typer.Option(True, "--log/--no-log", help="also put the report on the study's MLflow run"),
    tracking_uri: str | None = TRACKING,
) -> None:
    """One self-contained HTML report of a study: summary, best vs published, accuracy per class head to
    tail, the Optuna plots, every trial and the best configuration."""
    from ltstudy.study.results.report import write_report

    path = output or Path(f"{study}-report.html")
    info = write_report(_store(tracking_uri), study, str(path), log=log)
    console.print(f"wrote {path}" + (f" (also on MLflow run {info.parent_run_id} as report.html)" if log else ""))
