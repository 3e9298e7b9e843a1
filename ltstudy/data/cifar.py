"""CIFAR-10/100 read from the standard python-pickle batches.

The pickles are read directly rather than through torchvision's dataset classes, whose checksum
check rejects any copy that differs from the official archive (for example a subset).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ltstudy.errors import ConfigError, DataError

# name -> (folder, train files, test file, meta file, label key, class-name key)
_LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}

CifarArrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]

#: the only globals the official batches name: numpy's array and dtype reconstructors (numpy 1 and 2 names);
#: ``_codecs.encode`` is how a protocol-2 pickle written by Python 3 spells a bytes object
_ALLOWED_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                    for name in ("_reconstruct", "scalar")} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, str, numbers and numpy arrays; any other global (``os.system``,
    ``builtins.eval``, a class with a ``__reduce__``) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Load one pickle file, turning any read failure into a DataError naming it."""
    if not path.is_file():
        raise DataError(f"missing CIFAR file {path}; re-download the dataset (pass --download to fetch it)")
    try:
        with path.open("rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # truncated or corrupt pickles raise many different types
        raise DataError(f"cannot read CIFAR file {path} (truncated or corrupt?): {exc}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file {path} does not hold a dict")
    return obj


def _read_batches(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate batch files into (N,3,32,32) uint8 images and int64 labels."""
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"CIFAR file {path} lacks the 'data' or {label_key!r} entry")
        data = np.asarray(batch["data"], dtype=np.uint8)
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != lab.shape[0]:
            raise DataError(f"CIFAR file {path} has data of shape {data.shape} for {lab.shape[0]} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _download(root: Path, name: str) -> None:
    """Fetch the official archive through torchvision (needs internet)."""
    import torchvision.datasets  # only here: importing torchvision costs a study's driver about 2 s

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    cls(root=str(root), train=True, download=True)


def load_cifar(root: str | Path, name: str, download: bool = False) -> CifarArrays:
    """Load CIFAR-10 or CIFAR-100 from ``root``.

    Args:
        root: Folder holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        name: ``"cifar10"`` or ``"cifar100"``.
        download: Fetch the official archive with torchvision when the folder is missing.

    Returns:
        ``(train_images, train_labels, test_images, test_labels, class_names)``; images are uint8
        (N,3,32,32) tensors, labels int64.
    """
    if name not in _LAYOUTS:
        raise ConfigError(f"unknown CIFAR variant {name!r}; choose cifar10 or cifar100")
    folder_name, train_files, test_file, meta_file, label_key, names_key = _LAYOUTS[name]
    root = Path(root)
    folder = root / folder_name
    if not folder.is_dir():
        if not download:
            raise DataError(f"{name} not found: expected folder {folder}; pass --download to fetch it")
        _download(root, name)
        if not folder.is_dir():
            raise DataError(f"download of {name} did not create {folder}")
    meta = _unpickle(folder / meta_file)
    if names_key not in meta:
        raise DataError(f"CIFAR file {folder / meta_file} lacks {names_key!r}")
    train_x, train_y = _read_batches(folder, train_files, label_key)
    test_x, test_y = _read_batches(folder, (test_file,), label_key)
    return train_x, train_y, test_x, test_y, [str(n) for n in meta[names_key]]
