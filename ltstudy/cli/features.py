"""``ltstudy features extract``: the backbone feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

from ltstudy.cli.common import OVERRIDES, console, features_app


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
    from ltstudy.features.extract import extract_features, names_a_file

    if names_a_file(checkpoint):
        backbone = str(Path(checkpoint).expanduser().resolve())
    else:  # a trial's MLflow run id: only then is MLflow imported (extraction itself never needs it)
        from ltstudy.study.tracking.records import checkpoint_of_run

        backbone = checkpoint_of_run(tracking_uri, checkpoint)
    r = extract_features(backbone, storage=storage, overrides=parse_overrides(overrides or []), fmaps=fmaps, augmented_views=augmented_views, device=device,
                         endpoint_override=endpoint_url, force=force)
    rows = ", ".join(f"{k} {v}" for k, v in r.rows.items())
    console.print(f"feature cache {r.key} ({'reused' if r.reused else f'extracted in {r.seconds:.1f}s'})")
    console.print(f"rows: {rows}; dim {r.manifest.get('feature_dim')}; maps {r.manifest.get('fmap_shape')}")
    console.print(f"location: {r.location}")
    console.print(f"use it with: feature_key={r.key} feature_storage={r.storage.uri}")
