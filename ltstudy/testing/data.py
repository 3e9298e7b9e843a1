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
