"""The long-tailed training split, the balanced validation split and the carved sets of one training set.

The training counts are the papers' standard ones, n_i = floor(n_max · IF^(-i/(C-1))) with the dataset's
own n_max (500 for CIFAR-100, 5000 for CIFAR-10), so a CIFAR-100-LT IF 100 train set is the 500 … 5 of
the references. The validation images (and any set a method carves, such as MetaSAug's meta set) come
from the images each class's profile leaves out; only a class that cannot spare them (the head class,
which keeps every image in the references) gives up training images, and :class:`SplitIndices` says
which classes did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ltstudy.data.profile import lt_counts
from ltstudy.errors import ConfigError, DataError

#: Bump when the same settings start to select other images. It is part of every feature-cache key and
#: of every checkpoint, so a backbone's features are never rebuilt on a split it was not trained on.
#: 1: n_max shrunk to what every class could supply after validation; 2: the standard counts.
SPLIT_VERSION = 2


@dataclass(frozen=True)
class SplitIndices:
    """Indices of one long-tailed split into the source training set, and how it was drawn.

    Attributes:
        train: Sorted indices of the long-tailed training images.
        val: Sorted indices of the balanced validation images.
        carved: Sorted indices of each carved set, by name.
        n_max: The head count of the profile.
        target: The standard count n_i of each class.
        held: Images per class that validation and the carved sets take, by set name (``"val"`` first).
    """

    train: np.ndarray
    val: np.ndarray
    carved: dict[str, np.ndarray]
    n_max: int
    target: list[int]
    held: dict[str, int] = field(default_factory=dict)


def _class_pools(labels: np.ndarray, num_classes: int, seed: int, val_per_class: int,
                 carved: dict[str, int]) -> list[np.ndarray]:
    """Each class's indices, shuffled; a class without an image left for training is one line."""
    held = val_per_class + sum(carved.values())
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    for c, idx in enumerate(pools):
        if idx.size < held + 1:
            extra = "".join(f" + {n} {name}" for name, n in carved.items())
            raise DataError(f"class {c} has {idx.size} training images; need at least {held + 1} "
                            f"({val_per_class} for validation{extra} plus one for training)")
    return pools


def make_lt_splits(
    labels: np.ndarray,
    num_classes: int,
    imbalance: float,
    profile: str = "exp",
    val_per_class: int = 20,
    seed: int = 0,
    carved: dict[str, int] | None = None,
    n_max: int | None = None,
) -> SplitIndices:
    """Split a balanced training set into a long-tailed train split, a balanced val split and carved sets.

    Each class's indices are shuffled with ``np.random.default_rng(seed)``. The first ``val_per_class``
    form the validation set; the next n'_i = min(n_i, a_i - val_per_class - carved) the training set,
    where n_i is the standard count and a_i the images the class has; the ``carved`` sets
    (``{name: per class}``, in name order) follow. A class that can spare its held-out images keeps
    exactly n_i, and its training images are the same with or without carved sets; one that cannot
    (with CIFAR-100 and 20 per class: only the head class, 480 instead of 500) keeps what is left.

    Args:
        labels: Integer labels of the source training set, shape (N,).
        num_classes: Number of classes C; labels must lie in [0, C).
        imbalance: Imbalance factor IF >= 1.
        profile: ``"exp"`` or ``"step"``.
        val_per_class: Validation images per class (>= 0).
        seed: Seed of the split.
        carved: Extra balanced sets, images per class by name.
        n_max: Head count of the profile; default: the images of class 0 (the head class; the class index
            is the frequency rank in every CIFAR-LT reference).
    """
    labels = np.asarray(labels)
    carved = dict(sorted((carved or {}).items()))
    if val_per_class < 0 or any(n < 0 for n in carved.values()):
        raise ConfigError(f"images per class must be >= 0: val_per_class={val_per_class}, carved={carved}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    held = val_per_class + sum(carved.values())
    pools = _class_pools(labels, num_classes, seed, val_per_class, carved)
    head = int(pools[0].size) if n_max is None else int(n_max)
    target = lt_counts(head, num_classes, imbalance, profile)
    if min(target) < 1:
        raise ConfigError(f"IF {imbalance:g} leaves class {target.index(0)} no training image at n_max {head}; "
                          f"the tail count floor(n_max / IF) must be at least 1")
    train, val = [], []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in carved}
    for idx, n in zip(pools, target, strict=True):
        keep = min(n, idx.size - held)
        val.append(idx[:val_per_class])
        train.append(idx[val_per_class:val_per_class + keep])
        start = val_per_class + keep
        for name, k in carved.items():
            parts[name].append(idx[start:start + k])
            start += k

    def joined(chunks: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(chunks)).astype(np.int64)

    return SplitIndices(joined(train), joined(val), {name: joined(chunks) for name, chunks in parts.items()},
                        head, target, {"val": val_per_class, **carved})
