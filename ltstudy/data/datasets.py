"""Entry point of the data layer: build a long-tailed dataset and its loaders by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ltstudy.data.augment import AugmentSpec
from ltstudy.data.cifar import load_cifar
from ltstudy.data.containers import LTData, Split, split_in_memory
from ltstudy.data.filelist import FileListDataset, read_class_names, read_filelist
from ltstudy.data.loader import FileListLoader, TensorLoader
from ltstudy.data.preprocess import Preprocess
from ltstudy.data.samplers import sample_weights
from ltstudy.data.synthetic import make_synthetic
from ltstudy.errors import ConfigError, DataError


@dataclass(frozen=True)
class NamedLists:
    """A file-list benchmark known by name: its class count, training size and the references' list files.

    ``lists`` are the default file names of the train / val / test lists under the data root (the names
    the references ship: classifier-balancing, OLTR, LIFT); None where the benchmark has no such list
    (iNaturalist 2018 has no validation list: the references test on its official val split).
    """

    title: str
    family: str
    num_classes: int
    train_images: int
    lists: tuple[str | None, str | None, str | None]


#: the named file-list benchmarks (``--dataset imagenet-lt|places-lt|inat2018``); ``filelist`` is any other
NAMED_LISTS = {
    "imagenet-lt": NamedLists("ImageNet-LT", "imagenet", 1000, 115_846,
                              ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt")),
    "places-lt": NamedLists("Places-LT", "places", 365, 62_500,
                            ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt")),
    "inat2018": NamedLists("iNaturalist 2018", "inat", 8142, 437_513,
                           ("iNaturalist18_train.txt", None, "iNaturalist18_val.txt")),
}
DATASETS = ("cifar10-lt", "cifar100-lt", "filelist", *NAMED_LISTS, "synthetic")
#: dataset families, each with its own published recipes: name -> what it covers
FAMILIES = {
    "cifar10": "CIFAR-10-LT (and the synthetic smoke-test data)",
    "cifar100": "CIFAR-100-LT",
    "imagenet": "ImageNet-LT (and any other file list)",
    "places": "Places-LT",
    "inat": "iNaturalist 2018",
}
_FAMILY_OF = {"cifar10-lt": "cifar10", "cifar100-lt": "cifar100", "filelist": "imagenet", "synthetic": "cifar10",
              **{name: spec.family for name, spec in NAMED_LISTS.items()}}
#: the file-list datasets (decoded from image files listed in train / val / test lists)
LIST_DATASETS = ("filelist", *NAMED_LISTS)
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


def _list_split(path, role: str, dataset: str = "filelist") -> Split:
    """Read one file list into a Split."""
    if path is None:
        raise DataError(f"the {dataset} dataset needs a {role} list file ({role}_list=FILE)")
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


def _named_list(dataset: str, data_root, given, role: str, index: int) -> str | None:
    """A named benchmark's list: the one given, else the reference's file name under the data root."""
    if given is not None or dataset not in NAMED_LISTS:
        return given
    spec = NAMED_LISTS[dataset]
    default = spec.lists[index]
    if default is None:
        raise DataError(f"{spec.title} has no {role} list (the references test on its official val split, "
                        f"which is the test list here); give {role}_list=FILE, e.g. a split of the train list")
    path = Path(data_root) / default
    if not path.is_file():
        raise DataError(f"{spec.title}: {role} list {path} not found (give {role}_list=FILE)")
    return str(path)


def _build_filelist(data_root, train_list, val_list, test_list, image_size: int, carved: dict[str, int] | None,
                    seed: int, dataset: str = "filelist", class_names: str | None = None) -> LTData:
    """File-list data (ImageNet-LT / Places-LT / iNaturalist format) under ``data_root``.

    The lists fix the splits. Carved sets (MetaSAug's meta set) come from the validation list, as the
    MetaSAug reference samples its ImageNet-LT meta set from the ImageNet-LT val split; validation is the
    rest of that list. A named benchmark (``imagenet-lt``, ``places-lt``, ``inat2018``) finds its lists
    under the data root by the references' file names when they are not given, and its lists must name
    its number of classes. ``class_names`` is a class-names file (``read_class_names``).
    """
    if data_root is None:
        raise ConfigError(f"the {dataset} dataset needs a data root (the image folder)")
    if not Path(data_root).is_dir():
        raise DataError(f"image root {data_root} is not a folder")
    lists = [_named_list(dataset, data_root, given, role, i)
             for i, (given, role) in enumerate(((train_list, "train"), (val_list, "val"), (test_list, "test")))]
    train, val, test = (_list_split(p, r, dataset) for p, r in zip(lists, ("train", "val", "test"), strict=True))
    num_classes = int(max(s.labels.max() for s in (train, val, test))) + 1
    if dataset in NAMED_LISTS and num_classes != NAMED_LISTS[dataset].num_classes:
        spec = NAMED_LISTS[dataset]
        raise DataError(f"{spec.title} has {spec.num_classes} classes; its lists name {num_classes} "
                        f"(labels 0..{num_classes - 1})")
    counts = torch.bincount(train.labels, minlength=num_classes)
    if int(counts.min()) == 0:
        raise DataError(f"class {int(counts.argmin())} has no image in the train list {train_list}")
    parts: dict[str, Split] = {}
    if carved:
        val, parts = carve_list(val, carved, num_classes, seed)
    mean, std = IMAGENET_STATS
    names = read_class_names(class_names, num_classes) if class_names else [str(c) for c in range(num_classes)]
    return LTData(
        dataset,
        num_classes,
        names,
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
    class_names: str | Path | None = None,
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
        class_names: File lists: a class-names file (one name per line in label order; CIFAR's names come
            from its meta batch, the synthetic data's are ``class_c``).
    """
    if dataset in ("cifar10-lt", "cifar100-lt"):
        name = dataset.removesuffix("-lt")
        return _build_cifar(name, data_root, download, imbalance, profile, val_per_class, seed, carved)
    if dataset in LIST_DATASETS:
        return _build_filelist(data_root, train_list, val_list, test_list, image_size or 224, carved, seed,
                               dataset, str(class_names) if class_names else None)
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
    preprocess: Preprocess | None = None,
) -> TensorLoader | FileListLoader:
    """A loader over one split (``train``, ``val``, ``test`` or a carved set such as ``meta``): a
    :class:`TensorLoader` for in-memory data, a :class:`FileListLoader` for file lists.

    ``batch_size`` is global (split across ``world_size`` ranks); ``train`` shuffles or re-samples
    (``sampler``: instance, class_balanced, sqrt, power with ``sampler_q``) and augments (call ``set_epoch``
    before each epoch); ``num_workers``: DataLoader workers of file-list data (default min(4, cpu count));
    ``views``: independently augmented views of every image, batches are ``(x_1, ..., x_V, y)``.
    ``preprocess``: a pretrained model's preprocessing (``ltstudy.data.preprocess``): batches at its side,
    normalised with its mean and std; at evaluation its crop, or its five crops as five views.
    """
    part = _split(data, split)
    weights = None
    if train:
        counts = torch.bincount(part.labels, minlength=data.num_classes)
        weights = sample_weights(part.labels, counts, sampler, sampler_q)
    common = dict(
        batch_size=batch_size,
        device=device,
        mean=preprocess.mean if preprocess is not None else data.mean,
        std=preprocess.std if preprocess is not None else data.std,
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
        return TensorLoader(part.images, part.labels, views=views, preprocess=preprocess, **common)
    dataset = FileListDataset(data.image_root, part.paths, part.labels.numpy(), size=data.image_size, train=train,
                              color=bool(train and augment is not None and augment.color), views=views,
                              pre=preprocess)
    return FileListLoader(dataset, num_workers=num_workers, **common)

