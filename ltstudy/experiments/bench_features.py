"""``ltstudy bench features``: what the feature cache buys.

Reports the median Parquet read throughput (whole verified reads of the three split files, process cache
cleared before each), the wall time of one feature-stage trial on the cache, and the time to recompute the
same features with the backbone (the forward passes the cache saves every trial).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch

from ltstudy.config import DATA_KEYS, PATH_KEYS, load_data, parse_overrides, resolve_config
from ltstudy.features.extract import (
    build_backbone_model,
    compute_features,
    data_config,
    extract_features,
    load_backbone_checkpoint,
)
from ltstudy.features.store import SPLITS, clear_process_cache, load_split
from ltstudy.runtime import resolve_device
from ltstudy.train import TrialContext, run_trial


def bench_features(checkpoint: str | None = None, storage: str | None = None, method: str = "ce_classifier",
                   repeats: int = 5, device: str = "auto", overrides: list[str] | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    tmp = tempfile.mkdtemp(prefix="ltstudy-bench-")
    if checkpoint is None:
        cfg = resolve_config({"method": "ce", "dataset": "synthetic", "image_size": 32, "epochs": 1,
                              "batch_size": 64, "device": str(dev)})
        run_trial(cfg, ctx=TrialContext(checkpoint_dir=tmp))
        checkpoint = f"{tmp}/checkpoint.pt"
    storage = storage or f"{tmp}/store"
    extract = extract_features(checkpoint, storage=storage, overrides=parse_overrides(overrides or []),
                               device=dev, force=True)
    st, key = extract.storage, extract.key
    nbytes = sum(f["bytes"] for f in extract.manifest["files"].values())
    reads = []
    for _ in range(repeats):
        clear_process_cache()
        tic = time.perf_counter()
        for split in SPLITS:
            load_split(st, key, split, "cpu")
        reads.append(time.perf_counter() - tic)
    # recompute: the backbone forward over the three splits, without writing
    ckpt = load_backbone_checkpoint(checkpoint)
    dcfg = data_config(ckpt["config"], parse_overrides(overrides or []))
    data = load_data(dcfg)
    model, _ = build_backbone_model(ckpt, dcfg.train, data.num_classes)
    model.to(dev)
    tic = time.perf_counter()
    for split in SPLITS:
        compute_features(model, data, split, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    recompute = time.perf_counter() - tic
    backbone_cfg = ckpt["config"]
    trial_cfg = resolve_config({"method": method, "device": str(dev), "feature_storage": storage,
                                "feature_key": key, "backbone": checkpoint,
                                **{k: backbone_cfg[k] for k in DATA_KEYS
                                   if k in backbone_cfg and k != "seed" and k not in PATH_KEYS}})
    clear_process_cache()
    tic = time.perf_counter()
    run_trial(trial_cfg)
    trial = time.perf_counter() - tic
    return {"device": str(dev), "rows": sum(extract.rows.values()), "megabytes": nbytes / 1e6,
            "read_mb_per_s": nbytes / 1e6 / statistics.median(reads), "trial_seconds": trial,
            "recompute_seconds": recompute, "extract_seconds": extract.seconds}
