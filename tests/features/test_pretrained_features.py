"""``features extract --backbone timm:...``: a pretrained model's features in the cache (keyed by the model,
its weights' digest and its preprocessing), feeding tailcalibx and crt trials; what such a cache cannot
serve (a post-hoc rule needs a trained classifier, FSA needs maps) is one line."""

from __future__ import annotations

import pytest

from ltstudy.cli import main
from ltstudy.config import resolve_config
from ltstudy.errors import ConfigError
from ltstudy.features import clear_process_cache, load_features, read_manifest
from ltstudy.features.extract import extract_features
from ltstudy.train import run_trial

from support.pretrained import TINY_VIT, TINY_VIT_KWARGS, write_timm_weights

DATA = {"dataset": "synthetic", "image_size": 8, "synthetic_classes": 4, "imbalance": 20, "val_per_class": 5}


def _overrides(weights) -> list[str]:
    return [f"{k}={v}" for k, v in DATA.items()] + [f"pretrained={weights}", "model_kwargs={img_size: 16, "
            "patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]


def _extract_cli(capsys, storage, weights) -> str:
    with pytest.raises(SystemExit) as done:
        main(["features", "extract", "--backbone", TINY_VIT, "--storage", str(storage), "--device", "cpu",
              *_overrides(weights)])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    return next(line.split()[2] for line in out.splitlines() if line.startswith("feature cache "))


def test_extract_a_pretrained_backbone_and_key_it_by_its_weights(tmp_path, capsys):
    a = write_timm_weights(tmp_path / "a.safetensors", seed=1, head=5)
    b = write_timm_weights(tmp_path / "b.safetensors", seed=2, head=5)
    key = _extract_cli(capsys, tmp_path / "store", a)
    assert _extract_cli(capsys, tmp_path / "store", a) == key  # reused
    other = _extract_cli(capsys, tmp_path / "store", b)
    assert other != key  # other weights, other key
    from ltstudy.features import open_storage

    st = open_storage(str(tmp_path / "store"))
    manifest = read_manifest(st, key)
    assert manifest["feature_dim"] == 32 and manifest["head"] is None and manifest["head_type"] == "none"
    fields = manifest["key_fields"]
    assert fields["backbone"] == TINY_VIT and len(fields["weights_sha256"]) == 64
    assert manifest["source_checkpoint"]["preprocess"]["size"] == 16
    clear_process_cache()
    f, y, _ = load_features(str(tmp_path / "store"), key, "train")
    assert f.shape[1] == 32 and len(y) == manifest["rows"]["train"]


#: small enough for the tiny data (DLSA's flow and clusters as in the contract suite)
SMALL = {"dlsa": {"num_cluster": 8, "flow_epochs": 2, "flow_batch_size": 64}}


@pytest.mark.parametrize("method", ["tailcalibx", "crt", "ce_classifier", "dlsa"])
def test_pretrained_features_feed_feature_trials(method, tmp_path):
    weights = write_timm_weights(tmp_path / "w.safetensors", seed=1)
    cfg = resolve_config({"method": method, **DATA, "backbone": TINY_VIT, "pretrained": str(weights),
                          "model_kwargs": TINY_VIT_KWARGS, "feature_storage": str(tmp_path / "store"), "epochs": 2,
                          "device": "cpu", "batch_size": 32, **SMALL.get(method, {})})
    metrics = run_trial(cfg)
    assert 0.0 <= metrics["test_top1"] <= 1.0 and 0.0 <= metrics["val_ece"] <= 1.0
    # the same cache serves the next trial of another seed (the split is the extraction's)
    again = extract_features(TINY_VIT, storage=str(tmp_path / "store"),
                             overrides={**DATA, "pretrained": str(weights), "model_kwargs": TINY_VIT_KWARGS})
    assert again.reused


def test_what_a_pretrained_cache_cannot_serve_is_one_line(tmp_path):
    base = {**DATA, "backbone": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS, "feature_storage": str(tmp_path),
            "device": "cpu"}
    with pytest.raises(ConfigError, match="holds none"):
        run_trial(resolve_config({"method": "tau_norm", **base}))
    with pytest.raises(ConfigError, match="feature maps .* need a convolutional backbone"):
        run_trial(resolve_config({"method": "fsa", **base}))


def test_a_fine_tuned_pretrained_network_is_extracted_with_its_own_preprocessing(tmp_path):
    """ce fine-tunes the tiny ViT end to end (8-px data resized to its 16 px); its checkpoint's features come
    from the same network at the same side."""
    from ltstudy.train import TrialContext

    cfg = resolve_config({"method": "ce", **DATA, "model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS, "epochs": 1,
                          "device": "cpu", "batch_size": 32})
    run_trial(cfg, ctx=TrialContext(checkpoint_dir=str(tmp_path / "ce")))
    r = extract_features(str(tmp_path / "ce" / "checkpoint.pt"), storage=str(tmp_path / "store"), device="cpu")
    assert r.manifest["feature_dim"] == 32 and r.manifest["head_type"] == "linear"
    assert r.manifest["key_fields"]["crop_pct"] is None  # the model's own (timm's 0.9)
