"""The in-memory description of a long-tailed dataset (train / val / test splits)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ltstudy.data.splits import make_lt_splits


@dataclass
class Split:
    """One split, held in memory (CIFAR, synthetic) or as a file list.

    Attributes:
        labels: int64 (N,).
        indices: int64 (N,) positions in the source split (train or test file); the sample index
            of the feature cache.
        images: uint8 (N,3,H,W) for in-memory data, else None.
        paths: Image paths relative to the image root for file-list data, else None.
    """

    labels: torch.Tensor
    indices: torch.Tensor
    images: torch.Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LTData:
    """A long-tailed dataset: LT train split, balanced val and test splits, and their statistics.

    ``carved`` holds the extra balanced sets a method declared (``ImageMethod.carved_sets``), disjoint from
    every other split: for in-memory data from the images the long-tailed profile leaves out (like the
    validation set), for file lists from the validation list. ``target_counts`` are the standard counts of
    the profile (None for file lists, whose lists fix the counts) and ``held`` the images per class that
    validation and each carved set take (``{"val": 20, "meta": 10}``).
    """

    name: str
    num_classes: int
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    class_counts: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    image_root: str | None = None
    carved: dict[str, Split] = field(default_factory=dict)
    target_counts: list[int] | None = None
    held: dict[str, int] = field(default_factory=dict)

    @property
    def realised_imbalance(self) -> float:
        """n_max / n_min of the training split as drawn (IF 96 for CIFAR-100-LT IF 100: 480 / 5)."""
        counts = self.class_counts[self.class_counts > 0]
        return float(counts.max()) / float(counts.min()) if len(counts) else float("nan")

    def gave_up(self) -> dict[int, int]:
        """Classes that gave training images to the held-out sets: class -> standard count minus kept."""
        if self.target_counts is None:
            return {}
        kept = self.class_counts.tolist()
        return {c: t - k for c, (t, k) in enumerate(zip(self.target_counts, kept, strict=True)) if k < t}


def split_in_memory(
    name: str,
    arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]],
    *,
    imbalance: float,
    profile: str,
    val_per_class: int,
    seed: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    carved: dict[str, int] | None = None,
    n_max: int | None = None,
) -> LTData:
    """Turn a balanced in-memory train/test set into :class:`LTData` via :func:`make_lt_splits`.

    Args:
        name: Dataset name recorded in the result.
        arrays: ``(train_images, train_labels, test_images, test_labels, class_names)``.
        imbalance: Imbalance factor.
        profile: ``"exp"`` or ``"step"``.
        val_per_class: Balanced validation images per class, taken from the training images.
        seed: Split seed.
        mean: Per-channel mean of the images in [0,1].
        std: Per-channel std of the images in [0,1].
        carved: Extra balanced sets to carve from the training pool, images per class by name.
        n_max: Head count of the profile (default: the images of class 0).
    """
    train_x, train_y, test_x, test_y, class_names = arrays
    num_classes = len(class_names)
    split = make_lt_splits(train_y.numpy(), num_classes, imbalance, profile, val_per_class, seed, carved, n_max)

    def subset(idx) -> Split:
        idx = torch.from_numpy(idx)
        return Split(labels=train_y[idx].clone(), indices=idx, images=train_x[idx].clone())

    train = subset(split.train)
    test = Split(labels=test_y.clone(), indices=torch.arange(len(test_y)), images=test_x)
    counts = torch.bincount(train.labels, minlength=num_classes)
    return LTData(
        name,
        num_classes,
        list(class_names),
        train,
        subset(split.val),
        test,
        counts,
        tuple(mean),
        tuple(std),
        int(train_x.shape[-1]),
        carved={key: subset(idx) for key, idx in split.carved.items()},
        target_counts=split.target,
        held=split.held,
    )
