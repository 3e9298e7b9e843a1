"""Datasets generated on disk in the real formats: CIFAR-100 pickles and file-list JPEG trees."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg, write_file


def write_cifar100(root: Path, per_class: int = 25, classes: int = 100, test_per_class: int = 2) -> Path:
    """A CIFAR-100-shaped ``cifar-100-python/`` folder of random images under ``root``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), n)
        data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
        _pickle(folder / name, {"data": data, "fine_labels": labels.tolist(), "coarse_labels": [0] * labels.size})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(classes)], "coarse_label_names": []})
    return folder


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_jpeg(path: Path, h: int, w: int, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_jpeg(torch.full((3, h, w), value, dtype=torch.uint8)))


def write_filelist_tree(root: Path, counts: dict[str, list[int]]) -> tuple[Path, dict[str, Path]]:
    """An ImageNet-LT-shaped image tree and its list files: ``counts[split][label]`` JPEGs per class.

    Returns ``(image_root, {split: list file})``. Image sizes vary; names contain a space (allowed).
    """
    images = root / "images"
    lists = {}
    for split, per_class in counts.items():
        lines = []
        for label, n in enumerate(per_class):
            for k in range(n):
                rel = f"{split}/c{label}/img {k}.jpg"
                write_jpeg(images / rel, 40 + 7 * (k % 5), 50, (30 * label) % 256)
                lines.append(f"{rel} {label}")
        lists[split] = root / f"{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return images, lists


def write_imagenet_lt_tree(root: Path, classes: int = 40, n_max: int = 24, imbalance: float = 12.0,
                           val_per_class: int = 12, test_per_class: int = 2, seed: int = 0
                           ) -> tuple[Path, dict[str, Path], list[int]]:
    """An ImageNet-LT-shaped file-list dataset: many classes, JPEGs of varied sizes, long-tailed train counts
    (the exponential profile) assigned to classes in a random order (as in ImageNet-LT, the class index is
    not the frequency rank), balanced val and test lists. Returns ``(image_root, {split: list}, train_counts)``.
    """
    from ltstudy.data import lt_counts

    rng = np.random.default_rng(seed)
    counts = [int(n) for n in rng.permutation(lt_counts(n_max, classes, imbalance))]
    images = root / "images"
    lists: dict[str, Path] = {}
    for split, per_class in (("train", counts), ("val", [val_per_class] * classes),
                             ("test", [test_per_class] * classes)):
        lines = []
        for label, n in enumerate(per_class):
            base = rng.integers(0, 256, 3)
            for k in range(n):
                rel = f"{split}/n{label:04d}/{split}_{label}_{k}.JPEG"
                h, w = (int(v) for v in rng.integers(36, 72, 2))
                pixels = np.clip(base[:, None, None] + rng.normal(0, 24, (3, h, w)), 0, 255).astype(np.uint8)
                (images / rel).parent.mkdir(parents=True, exist_ok=True)
                write_file(str(images / rel), encode_jpeg(torch.from_numpy(pixels)))
                lines.append(f"{rel} {label}")
        lists[split] = root / f"ImageNet_LT_{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return images, lists, counts
