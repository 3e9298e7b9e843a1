"""Studies on pretrained backbones (tiny random timm ViTs, no download): ``features extract --backbone timm:...``
feeds a tailcalibx and a crt study (the latter accuracy against ECE), and a lift study whose hub tag the
driver resolves from the weights cache once, before Ray, pinning the file for every trial."""

from __future__ import annotations

import json
import math

import pytest

from ltstudy.cli import main
from ltstudy.models.weights import MANIFEST, cache_folder, parse_model_name, weights_digest
from ltstudy.study.run import StudyOptions, run_study

from support.pretrained import TINY_VIT, TINY_VIT_KWARGS, write_timm_weights

pytestmark = pytest.mark.slow

DATA = {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4, "imbalance": 20, "val_per_class": 5,
        "device": "cpu"}


def _study(method: str, tmp_path, overrides: dict, trials: int = 2, space: str | None = None, **opts):
    return run_study(StudyOptions(
        method=method, num_trials=trials, max_concurrent=1, sampler="random", seed=0, scheduler="none",
        storage=str(tmp_path / "storage"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        study_name=f"{method}-pretrained", retries=0, verbose=0, fixed=overrides, space_path=space, **opts))


def test_extracted_pretrained_features_feed_a_tailcalibx_and_a_crt_study(ray_local, tmp_path, capsys):
    weights = write_timm_weights(tmp_path / "model.safetensors", seed=1, head=3)
    storage = tmp_path / "storage"
    with pytest.raises(SystemExit) as done:
        main(["features", "extract", "--backbone", TINY_VIT, "--storage", str(storage), "--device", "cpu",
              *(f"{k}={v}" for k, v in DATA.items() if k != "device"), f"pretrained={weights}",
              "model_kwargs=" + json.dumps(TINY_VIT_KWARGS)])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    key = next(line.split()[2] for line in out.splitlines() if line.startswith("feature cache "))
    common = {**DATA, "pretrained": str(weights), "model_kwargs": TINY_VIT_KWARGS, "epochs": 2, "batch_size": 32}
    summary = _study("tailcalibx", tmp_path, common, backbone=TINY_VIT)
    assert summary.counts == {"completed": 2}, summary.counts
    assert all(t["params"]["feature_key"] == key for t in summary.trials)  # the extracted cache, reused
    space = tmp_path / "crt.yaml"  # accuracy against calibration
    space.write_text("method: crt\nmetric: [val_top1, val_ece]\nmode: [max, min]\nfixed: {}\ntune:\n"
                     "  lr: {type: float, low: 0.01, high: 1.0, log: true}\n")
    summary = _study("crt", tmp_path, common, trials=3, space=str(space), backbone=TINY_VIT)
    assert summary.counts == {"completed": 3}, summary.counts
    for t in summary.trials:
        assert t["params"]["feature_key"] == key
        assert math.isfinite(t["metrics"]["val_ece"]) and 0 <= t["metrics"]["val_ece"] <= 1


def test_a_lift_study_loads_the_cached_hub_weights_every_trial(ray_local, tmp_path):
    """model=timm:NAME.TAG: the driver finds the tag's file in STORAGE/weights (as a fetch leaves it), checks it
    and pins pretrained=FILE; the trials load that file (their resolved config says so)."""
    name = f"{TINY_VIT}.augreg_in21k"
    src = write_timm_weights(tmp_path / "model.safetensors", seed=5, head=3)
    folder = cache_folder(tmp_path / "storage" / "weights", parse_model_name(name), "augreg_in21k")
    folder.mkdir(parents=True)
    cached = folder / "model.safetensors"
    cached.write_bytes(src.read_bytes())
    (folder / MANIFEST).write_text(json.dumps({"file": cached.name, "bytes": cached.stat().st_size,
                                               "sha256": weights_digest(cached)}))
    overrides = {**DATA, "model": name, "model_kwargs": TINY_VIT_KWARGS, "epochs": 1, "batch_size": 32,
                 "tte": False}
    summary = _study("lift", tmp_path, overrides, trials=1)
    assert summary.counts == {"completed": 1}, summary.counts
    assert summary.trials[0]["params"]["pretrained"] == str(cached)
    # every finished trial carries its calibration bins, the study run and the report the diagram
    from mlflow.tracking import MlflowClient

    from ltstudy.study.results.report import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = {a.path for a in MlflowClient(uri).list_artifacts(summary.trials[0]["run_id"])}
    assert "reliability.json" in names
    html, _, pngs, _ = build_report(uri, "lift-pretrained")
    assert pngs["reliability_best_vs_published"].startswith(b"\x89PNG")
    assert "<h2>Calibration</h2>" in html and 'id="plot-reliability_best_vs_published"' in html
