"""Long-tailed datasets, splits, samplers, batch augmentation and loaders (pure torch/numpy/torchvision)."""

from ltstudy.data.augment import AugmentSpec, apply, autoaugment, cutout, normalize, random_crop, random_flip
from ltstudy.data.cifar import load_cifar
from ltstudy.data.containers import LTData, Split
from ltstudy.data.datasets import (
    DATASETS,
    FAMILIES,
    LIST_DATASETS,
    NAMED_LISTS,
    build_data,
    dataset_family,
    make_loader,
)
from ltstudy.data.filelist import FileListDataset, read_class_names, read_filelist
from ltstudy.data.loader import FileListLoader, TensorLoader
from ltstudy.data.preprocess import Preprocess
from ltstudy.data.profile import PROFILES, lt_counts
from ltstudy.data.samplers import SAMPLERS, epoch_order, sample_weights
from ltstudy.data.splits import SPLIT_VERSION, SplitIndices, make_lt_splits
from ltstudy.data.synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "FAMILIES",
    "LIST_DATASETS",
    "NAMED_LISTS",
    "PROFILES",
    "SAMPLERS",
    "SPLIT_VERSION",
    "AugmentSpec",
    "FileListDataset",
    "FileListLoader",
    "LTData",
    "Preprocess",
    "Split",
    "SplitIndices",
    "TensorLoader",
    "apply",
    "autoaugment",
    "build_data",
    "dataset_family",
    "cutout",
    "epoch_order",
    "lt_counts",
    "load_cifar",
    "make_loader",
    "make_lt_splits",
    "make_synthetic",
    "normalize",
    "random_crop",
    "random_flip",
    "read_class_names",
    "read_filelist",
    "sample_weights",
]
