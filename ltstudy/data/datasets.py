"""Entry point of the data layer: build a long-tailed dataset and its loaders by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ltstudy.data.augment import AugmentSpec
from ltstudy.data.cifar import load_cifar
from ltstudy.data.containers import LTData, Split, split_in_memory
from ltstudy.data.filelist import FileListDataset, read_filelist
from ltstudy.data.loader import FileListLoader, TensorLoader
from ltstudy.data.samplers import sample_weights
from ltstudy.data.synthetic import make_synthetic
from ltstudy.errors import ConfigError, DataError

DATASETS = ("cifar10-lt", "cifar100-lt", "filelist", "synthetic")
#: dataset families, each with its own published recipes: name -> what it covers
FAMILIES = {
    "cifar10": "CIFAR-10-LT (and the synthetic smoke-test data)",
    "cifar100": "CIFAR-100-LT",
    "imagenet": "ImageNet-LT / Places-LT / iNaturalist (file lists)",
}
_FAMILY_OF = {"cifar10-lt": "cifar10", "cifar100-lt": "cifar100", "filelist": "imagenet", "synthetic": "cifar10"}
SPLITS = ("train", "val", "test")

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

__all__ = ["DATASETS", "FAMILIES", "LTData", "Split", "build_data", "dataset_family", "make_loader"]


def dataset_family(dataset: str) -> str:
    """The recipe family of a dataset name (``cifar10-lt`` -> ``cifar10``, ``filelist`` -> ``imagenet``)."""
    try:
        return _FAMILY_OF[dataset]
    except KeyError:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}") from None


def _build_cifar(name: str, data_root, download, imbalance, profile, val_per_class, seed, carved) -> LTData:
    """CIFAR-10/100-LT with the balanced val split drawn from the training images the profile leaves out."""
    if data_root is None:
        raise ConfigError(f"{name}-lt needs a data root (the folder holding the CIFAR pickles)")
    mean, std = CIFAR_STATS[name]
    arrays = load_cifar(data_root, name, download)
    return split_in_memory(
        f"{name}-lt",
        arrays,
        imbalance=imbalance,
        profile=profile,
        val_per_class=val_per_class,
        seed=seed,
        mean=mean,
        std=std,
        carved=carved,
    )


def _list_split(path, role: str) -> Split:
    """Read one file list into a Split."""
    if path is None:
        raise DataError(f"the filelist dataset needs a {role} list file (--{role}-list)")
    paths, labels = read_filelist(path)
    return Split(labels=torch.from_numpy(labels), indices=torch.arange(len(paths)), paths=paths)


def carve_list(split: Split, carved: dict[str, int], num_classes: int, seed: int) -> tuple[Split, dict[str, Split]]:
    """Carve balanced sets (``{name: per class}``, name order) from a list split; the rest stays in it.

    Each class's images are shuffled with ``np.random.default_rng(seed)``; the carved sets take the first
    ones. Every class must keep at least one image in ``split``.
    """
    rng = np.random.default_rng(seed)
    labels = split.labels.numpy()
    keep, parts = [], {name: [] for name in sorted(carved)}
    need = sum(carved.values())
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < need + 1:
            sets = " + ".join(f"{n} {name}" for name, n in sorted(carved.items()))
            raise DataError(f"class {c} has {idx.size} images in the validation list; need at least {need + 1} "
                            f"({sets} carved from it, plus one left for validation)")
        start = 0
        for name in parts:
            parts[name].append(idx[start:start + carved[name]])
            start += carved[name]
        keep.append(idx[start:])

    def take(chunks: list[np.ndarray]) -> Split:
        rows = torch.from_numpy(np.sort(np.concatenate(chunks)).astype(np.int64))
        assert split.paths is not None
        return Split(labels=split.labels[rows].clone(), indices=split.indices[rows].clone(),
                     paths=[split.paths[i] for i in rows.tolist()])

    return take(keep), {name: take(chunks) for name, chunks in parts.items()}


def _build_filelist(data_root, train_list, val_list, test_list, image_size: int, carved: dict[str, int] | None,
                    seed: int) -> LTData:
    """File-list data (ImageNet-LT / Places-LT / iNaturalist format) under ``data_root``.

    The lists fix the splits. Carved sets (MetaSAug's meta set) come from the validation list, as the
    MetaSAug reference samples its ImageNet-LT meta set from the ImageNet-LT val split; validation is the
    rest of that list.
    """
    if data_root is None:
        raise ConfigError("the filelist dataset needs a data root (the image folder)")
    if not Path(data_root).is_dir():
        raise DataError(f"image root {data_root} is not a folder")
    train, val, test = (
        _list_split(p, r) for p, r in ((train_list, "train"), (val_list, "val"), (test_list, "test"))
    )
    num_classes = int(max(s.labels.max() for s in (train, val, test))) + 1
    counts = torch.bincount(train.labels, minlength=num_classes)
    if int(counts.min()) == 0:
        raise DataError(f"class {int(counts.argmin())} has no image in the train list {train_list}")
    parts: dict[str, Split] = {}
    if carved:
        val, parts = carve_list(val, carved, num_classes, seed)
    mean, std = IMAGENET_STATS
    return LTData(
        "filelist",
        num_classes,
        [str(c) for c in range(num_classes)],
        train,
        val,
        test,
        counts,
        mean,
        std,
        image_size,
        image_root=str(data_root),
        carved=parts,
        held=dict(sorted((carved or {}).items())),
    )


def build_data(
    dataset: str,
    *,
    data_root: str | Path | None = None,
    download: bool = False,
    imbalance: float = 100.0,
    profile: str = "exp",
    val_per_class: int = 20,
    seed: int = 0,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    image_size: int | None = None,
    synthetic_classes: int = 10,
    carved: dict[str, int] | None = None,
) -> LTData:
    """Build a long-tailed dataset by name.

    Args:
        dataset: One of :data:`DATASETS`.
        data_root: CIFAR root (holding the pickle folders) or the image root of a file list.
        download: Fetch CIFAR through torchvision when missing.
        imbalance: Imbalance factor (CIFAR, synthetic).
        profile: ``"exp"`` or ``"step"`` (CIFAR, synthetic).
        val_per_class: Balanced validation images per class (CIFAR, synthetic).
        seed: Split seed.
        train_list: Train list file (filelist).
        val_list: Validation list file (filelist).
        test_list: Test list file (filelist).
        image_size: Side of the file-list crops (default 224) or of the synthetic images (default
            32); CIFAR is always 32.
        synthetic_classes: Classes of the synthetic dataset.
        carved: Extra balanced sets to carve from the training pool (``{name: images per class}``,
            e.g. MetaSAug's meta set), in ``LTData.carved``; file lists carve them from the val list.
    """
    if dataset in ("cifar10-lt", "cifar100-lt"):
        name = dataset.removesuffix("-lt")
        return _build_cifar(name, data_root, download, imbalance, profile, val_per_class, seed, carved)
    if dataset == "filelist":
        return _build_filelist(data_root, train_list, val_list, test_list, image_size or 224, carved, seed)
    if dataset == "synthetic":
        return make_synthetic(
            num_classes=synthetic_classes,
            imbalance=imbalance,
            image_size=image_size or 32,
            val_per_class=val_per_class,
            seed=seed,
            profile=profile,
            carved=carved,
        )
    raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _split(data: LTData, split: str) -> Split:
    if split in SPLITS:
        return getattr(data, split)
    if split in data.carved:
        return data.carved[split]
    raise ConfigError(f"unknown split {split!r}; choose one of {', '.join([*SPLITS, *data.carved])}")


def make_loader(
    data: LTData,
    split: str,
    *,
    batch_size: int,
    device: str | torch.device,
    train: bool,
    augment: AugmentSpec | None = None,
    sampler: str = "instance",
    sampler_q: float = 0.5,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    num_workers: int | None = None,
    drop_last: bool = False,
    views: int = 1,
) -> TensorLoader | FileListLoader:
    """A loader over one split (``train``, ``val``, ``test`` or a carved set such as ``meta``): a
    :class:`TensorLoader` for in-memory data, a :class:`FileListLoader` for file lists.

    ``batch_size`` is global (split across ``world_size`` ranks); ``train`` shuffles or re-samples
    (``sampler``: instance, class_balanced, sqrt, power with ``sampler_q``) and augments (call ``set_epoch``
    before each epoch); ``num_workers``: DataLoader workers of file-list data (default min(4, cpu count));
    ``views``: independently augmented views of every image, batches are ``(x_1, ..., x_V, y)``.
    """
    part = _split(data, split)
    weights = None
    if train:
        counts = torch.bincount(part.labels, minlength=data.num_classes)
        weights = sample_weights(part.labels, counts, sampler, sampler_q)
    common = dict(
        batch_size=batch_size,
        device=device,
        mean=data.mean,
        std=data.std,
        train=train,
        augment=augment,
        sampler_weights=weights,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        channels_last=channels_last,
    )
    if part.images is not None:
        return TensorLoader(part.images, part.labels, views=views, **common)
    dataset = FileListDataset(data.image_root, part.paths, part.labels.numpy(), size=data.image_size, train=train,
                              color=bool(train and augment is not None and augment.color), views=views)
    return FileListLoader(dataset, num_workers=num_workers, **common)

