"""``ltstudy features extract``: the backbone feature cache."""

from __future__ import annotations

from pathlib import Path

import typer

from ltstudy.cli.common import DATA_ROOT, DATASET, IMBALANCE, OVERRIDES, console, features_app


@features_app.command("extract")
def features_extract(
    checkpoint: str | None = typer.Option(None, "--checkpoint",
                                          help="backbone checkpoint.pt, its folder, or a trial's MLflow run id"),
    backbone: str | None = typer.Option(None, "--backbone", help="or a pretrained model: timm:NAME or "
                                        "open_clip:ARCH/TAG (weights: pretrained=FILE or a hub tag; data: "
                                        "--dataset and the other data settings)"),
    dataset: str | None = DATASET,
    data_root: str | None = DATA_ROOT,
    imbalance: float | None = IMBALANCE,
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="for a run id"),
    storage: str | None = typer.Option(None, "--storage", help="cache root URI (default ./ltstudy_results)"),
    fmaps: bool = typer.Option(False, "--fmaps/--no-fmaps", help="also store last-stage train maps (FSA)"),
    augmented_views: int = typer.Option(0, "--augmented-views", help="extra augmented train passes"),
    endpoint_url: str | None = typer.Option(None, "--endpoint-url", help="S3 endpoint override"),
    device: str = typer.Option("auto", "--device"),
    force: bool = typer.Option(False, "--force", help="re-extract even when a valid cache exists"),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Extract train/val/test features of a backbone checkpoint, or of a pretrained timm / open_clip model,
    into the cache; prints the key."""
    from ltstudy.config import parse_overrides, stage_weights
    from ltstudy.errors import LtstudyError
    from ltstudy.features.extract import extract_features, names_a_file, pretrained_config
    from ltstudy.models import is_pretrained_name

    values = parse_overrides(overrides or [])
    flags = {"dataset": dataset, "data_root": data_root, "imbalance": imbalance}
    values.update({k: v for k, v in flags.items() if v is not None})
    if (checkpoint is None) == (backbone is None):
        raise LtstudyError("give --checkpoint (a trained backbone) or --backbone (a pretrained timm:/open_clip: "
                           "model), one of them")
    if backbone is not None:
        if not is_pretrained_name(backbone):
            raise LtstudyError(f"--backbone takes timm:NAME or open_clip:ARCH/TAG, got {backbone!r} (a trained "
                               "backbone is --checkpoint)")
        # a hub tag is fetched once, here, into STORAGE/weights; the key holds the file's sha256
        values.update(stage_weights(pretrained_config(backbone, values), storage))
        source = backbone
    elif names_a_file(checkpoint):
        source = str(Path(checkpoint).expanduser().resolve())
    else:  # a trial's MLflow run id: only then is MLflow imported (extraction itself never needs it)
        from ltstudy.study.tracking.records import checkpoint_of_run

        source = checkpoint_of_run(tracking_uri, checkpoint)
    r = extract_features(source, storage=storage, overrides=values, fmaps=fmaps, augmented_views=augmented_views,
                         device=device, endpoint_override=endpoint_url, force=force)
    rows = ", ".join(f"{k} {v}" for k, v in r.rows.items())
    console.print(f"feature cache {r.key} ({'reused' if r.reused else f'extracted in {r.seconds:.1f}s'})")
    console.print(f"rows: {rows}; dim {r.manifest.get('feature_dim')}; maps {r.manifest.get('fmap_shape')}")
    console.print(f"location: {r.location}")
    console.print(f"use it with: feature_key={r.key} feature_storage={r.storage.uri}", soft_wrap=True)
