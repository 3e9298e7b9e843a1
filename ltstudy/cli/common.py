"""What every command group shares: the app, the console, common options and table helpers."""

from __future__ import annotations

import math
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect long-tailed datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput and memory benchmarks.")
features_app = typer.Typer(no_args_is_help=True, help="The backbone feature cache (Parquet).")
best_config_app = typer.Typer(no_args_is_help=True, help="Export the best configuration of a study.")
studies_app = typer.Typer(no_args_is_help=True, help="Studies in a tracking store.")
cluster_app = typer.Typer(no_args_is_help=True, help="Run studies on a Ray cluster (cluster.yaml).")
app.add_typer(datasets_app, name="datasets")
app.add_typer(bench_app, name="bench")
app.add_typer(features_app, name="features")
app.add_typer(best_config_app, name="best-config")
app.add_typer(studies_app, name="studies")
app.add_typer(cluster_app, name="cluster")

console = Console(highlight=False)
OVERRIDES = typer.Argument(None, metavar="[KEY=VALUE]...", help="override any config key")
METHOD = typer.Option(None, "--method", "-m", help="method name (see `ltstudy methods`)")
DATASET = typer.Option(None, "--dataset", "-d", help="cifar10-lt | cifar100-lt | filelist | imagenet-lt | "
                       "places-lt | inat2018 | synthetic")
IMBALANCE = typer.Option(None, "--imbalance", help="imbalance factor n_max/n_min (>= 1)")
DATA_ROOT = typer.Option(None, "--data-root", help="folder holding the dataset")
CONFIG = typer.Option(None, "--config", "-c", help="YAML config file")
DOWNLOAD = typer.Option(None, "--download/--no-download", help="fetch missing CIFAR data")
TRACKING = typer.Option(None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<cwd>/mlflow.db)")


def pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def metrics_table(rows: dict[str, dict[str, float]], title: str = "metrics (%)") -> Table:
    table = Table(title=title)
    for col in ("split", "top-1", "many", "medium", "few", "ECE", "ECE many/med/few", "loss"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, m in rows.items():
        table.add_row(split, pct(m.get("top1")), pct(m.get("many")), pct(m.get("medium")),
                      pct(m.get("few")), pct(m.get("ece")),
                      f"{pct(m.get('ece_many'))}/{pct(m.get('ece_medium'))}/{pct(m.get('ece_few'))}",
                      f"{m.get('loss', math.nan):.4f}")
    return table


def split_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and
            not k.endswith(("per_class", "reliability"))}
