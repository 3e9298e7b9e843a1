"""Extraction from a real (tiny) backbone checkpoint: rows, pooled maps, reuse, damaged-cache rebuild."""

from __future__ import annotations

import torch

from ltstudy.features import clear_process_cache, load_features
from ltstudy.features.extract import extract_features


def test_extract_reuse_and_rebuild(synthetic_backbone, tmp_path):
    synthetic_store = str(tmp_path)  # its own store: the first extraction must not find a cache
    r = extract_features(synthetic_backbone, storage=synthetic_store, fmaps=True, device="cpu")
    assert not r.reused and set(r.rows) == {"train", "val", "test"}
    clear_process_cache()
    f, y, idx, maps = load_features(synthetic_store, r.key, "train", fmaps=True)
    assert f.shape == (r.rows["train"], 64) and maps.shape == (r.rows["train"], 64, 8, 8)
    assert torch.allclose(maps.mean((2, 3)), f, atol=1e-5)  # the feature is the pooled map
    assert r.manifest["head_type"] == "linear" and r.manifest["num_classes"] == 10
    again = extract_features(synthetic_backbone, storage=synthetic_store, fmaps=True, device="cpu")
    assert again.reused and again.key == r.key
    # damage it: extract removes and rebuilds
    path = r.storage.path(r.key, "val.parquet")
    data = bytearray(open(path, "rb").read())
    data[-20] ^= 1
    open(path, "wb").write(bytes(data))
    rebuilt = extract_features(synthetic_backbone, storage=synthetic_store, fmaps=True, device="cpu")
    assert not rebuilt.reused and rebuilt.key == r.key
    clear_process_cache()
    assert load_features(synthetic_store, r.key, "val")[0].shape[0] == r.rows["val"]
