"""``ltstudy bench features``: what the feature cache buys, how fast it reads, and TailCalibX at ImageNet scale.

* ``cache``: the median Parquet read throughput of a backbone's cache (whole verified reads of the three split
  files, process cache cleared before each), the wall time of one feature-stage trial on it, and the time to
  recompute the same features with the backbone (the forward passes the cache saves every trial).
* ``read``: read throughput of random float32 features of given shapes (100,000 x 512; ImageNet-LT's
  115,846 x 2,048) against the machine's raw file read (``cat file > /dev/null``), both from disk (the
  file's pages dropped with ``posix_fadvise(DONTNEED)`` before each read, no other file touched) and from the
  page cache. A read is ``load_split`` into a torch tensor: memory map, Parquet decode, tensor view; the first
  read of a process also checks the file's sha256.
* ``tailcalibx``: one TailCalibX trial's set-up (statistics of every class, nearest classes) and seconds per
  epoch (generation + classifier steps) on random ImageNet-LT-shaped features (1,000 classes, D = 2,048,
  115,846 train rows with ImageNet-LT's head 1,280, tail 5 and many / medium / few split 385 / 479 / 136),
  with the peak resident memory of the process that ran it.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import numpy as np
import torch

from ltstudy.config import DATA_KEYS, PATH_KEYS, load_data, parse_overrides, resolve_config
from ltstudy.features.extract import (
    build_backbone_model,
    compute_features,
    data_config,
    extract_features,
    load_backbone_checkpoint,
)
from ltstudy.features.store import (
    SPLITS,
    SplitArrays,
    clear_process_cache,
    load_split,
    open_storage,
    write_cache,
)
from ltstudy.methods import FeatureSet, MethodContext, get_method
from ltstudy.runtime import optimizer_step, resolve_device
from ltstudy.train import TrialContext, run_trial
from ltstudy.train.optim import make_optimizer

IMAGENET_LT_ROWS = 115_846


def bench_cache(checkpoint: str | None = None, storage: str | None = None, method: str = "ce_classifier",
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
    shutil.rmtree(tmp, ignore_errors=True)
    return {"device": str(dev), "rows": sum(extract.rows.values()), "megabytes": nbytes / 1e6,
            "read_mb_per_s": nbytes / 1e6 / statistics.median(reads), "trial_seconds": trial,
            "recompute_seconds": recompute, "extract_seconds": extract.seconds}


# -- read throughput ----------------------------------------------------------------------------------------


def _drop_pages(path: str) -> None:
    """Evict one file's pages from the page cache (this file only; nothing else on the machine is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _raw_read(path: str) -> float:
    tic = time.perf_counter()
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - tic


def _our_read(st: Any, key: str, verified: bool) -> float:
    clear_process_cache(verified=not verified)
    tic = time.perf_counter()
    split = load_split(st, key, "train", "cpu")
    assert split.features.dtype == torch.float32
    return time.perf_counter() - tic


def bench_read(shapes: list[tuple[int, int]], storage: str | None = None, repeats: int = 5) -> list[dict[str, Any]]:
    """Read MB/s of a (rows x dim) float32 train split, cold and warm, beside ``cat`` on the same file."""
    rows_out = []
    tmp = tempfile.mkdtemp(prefix="ltstudy-bench-read-")
    try:
        for n, d in shapes:
            st = open_storage(storage or tmp)
            gen = torch.Generator().manual_seed(0)
            feats = torch.empty(n, d).normal_(generator=gen).abs_()
            small = SplitArrays(torch.arange(10), torch.zeros(10, dtype=torch.long), feats[:10])
            train = SplitArrays(torch.arange(n), torch.randint(0, 1000, (n,), generator=gen), feats)
            key = f"bench-read-{n}x{d}"
            write_cache(st, key, {"train": train, "val": small, "test": small})
            del feats, train
            path = st.path(key, "train.parquet")
            size = os.path.getsize(path)
            result: dict[str, Any] = {"rows": n, "dim": d, "megabytes": size / 1e6}
            for label, before in (("cold", _drop_pages), ("warm", lambda p: None)):
                raw, first, verified = [], [], []
                for _ in range(repeats):
                    before(path)
                    raw.append(_raw_read(path))
                    before(path)
                    first.append(_our_read(st, key, verified=False))
                    before(path)
                    verified.append(_our_read(st, key, verified=True))
                mbs = {name: size / 1e6 / statistics.median(times)
                       for name, times in (("raw", raw), ("first", first), ("read", verified))}
                result.update({f"{label}_{k}_mb_per_s": v for k, v in mbs.items()})
                result[f"{label}_ratio"] = mbs["read"] / mbs["raw"]
            clear_process_cache()
            rows_out.append(result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows_out


# -- TailCalibX at ImageNet-LT scale ------------------------------------------------------------------------


def imagenet_lt_counts(classes: int = 1000, total: int = IMAGENET_LT_ROWS) -> list[int]:
    """Head-to-tail class counts shaped like ImageNet-LT's: 1,280 ... 5, 385 / 479 / 136 classes with more
    than 100 / 20 to 100 / fewer than 20 images (log-linear between those anchors), summing to ``total``."""
    ranks = np.arange(classes)
    scale = classes / 1000

    def profile(v: float) -> np.ndarray:
        xs = np.array([0, 40, 384, 863, 999]) * scale
        return np.floor(np.exp(np.interp(ranks, xs, np.log([1280, v, 101, 20, 5]))) + 1e-6).astype(int)

    lo, hi = 101.0, 1280.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if profile(mid).sum() > total else (mid, hi)
    counts = profile(lo)
    counts[1:1 + total - int(counts.sum())] += 1  # the rounding remainder, to the largest classes after the head
    return [int(c) for c in counts]


def _tailcalibx_run(n_classes: int, dim: int, epochs: int, rows: int, queue: Any) -> None:
    counts = imagenet_lt_counts(n_classes, rows)
    gen = torch.Generator().manual_seed(0)
    train_y = torch.repeat_interleave(torch.arange(n_classes), torch.tensor(counts))
    train_x = torch.empty(len(train_y), dim).normal_(generator=gen).abs_()  # ReLU-like, non-negative
    val_y = torch.arange(n_classes).repeat_interleave(20)
    test_y = torch.arange(n_classes).repeat_interleave(50)
    val_x = torch.empty(len(val_y), dim).normal_(generator=gen).abs_()
    test_x = torch.empty(len(test_y), dim).normal_(generator=gen).abs_()
    feats = FeatureSet(train_x, train_y, val_x, val_y, test_x, test_y, n_classes, torch.tensor(counts))
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = resolve_config({"method": "tailcalibx", "dataset": "filelist", "epochs": epochs, "device": "cpu"})
    spec = get_method("tailcalibx")
    ctx = MethodContext(num_classes=n_classes, class_counts=feats.class_counts, epochs=epochs,
                        device=torch.device("cpu"), model_name="-", train=cfg.train)
    torch.manual_seed(0)
    method = spec(cfg.params, ctx)
    tic = time.perf_counter()
    method.prepare(feats)
    prepare = time.perf_counter() - tic
    optimizer = make_optimizer(method.classifier().parameters(), cfg.train)
    per_epoch, steps = [], 0
    for epoch in range(epochs):
        tic = time.perf_counter()
        method.on_epoch_start(epoch)
        for batch in method.batches(epoch):
            optimizer_step(optimizer, method.batch_loss(batch))
            steps += 1
        per_epoch.append(time.perf_counter() - tic)
    with torch.no_grad():
        method.logits("val")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"rows": len(train_y), "classes": n_classes, "dim": dim, "prepare_seconds": prepare,
               "epoch_seconds": statistics.median(per_epoch), "steps_per_epoch": steps // epochs,
               "peak_rss_mib": peak_kib / 1024, "features_rss_mib": base_kib / 1024,
               "features_mib": (train_x.numel() + val_x.numel() + test_x.numel()) * 4 / 2**20})


def bench_tailcalibx(classes: int = 1000, dim: int = 2048, epochs: int = 1,
                     rows: int = IMAGENET_LT_ROWS) -> dict[str, Any]:
    """Run in a fresh process, so its peak resident memory is TailCalibX's plus the features'."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_tailcalibx_run, args=(classes, dim, epochs, rows, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still running, or died (out of memory) without a result
            if not proc.is_alive():
                raise RuntimeError(f"the TailCalibX benchmark process ended with code {proc.exitcode} "
                                   "before reporting") from None
    proc.join()
    return result
