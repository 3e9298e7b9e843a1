"""The long-tailed training split and the balanced validation split drawn from one training set."""

from __future__ import annotations

import math

import numpy as np

from ltstudy.data.profile import lt_counts, profile_ratios
from ltstudy.errors import ConfigError, DataError


def largest_n_max(available: list[int], num_classes: int, imbalance: float, profile: str) -> int:
    """Largest head count such that every class can supply its profile count.

    Args:
        available: Images each class has left after the validation set is taken out.
        num_classes: Number of classes C.
        imbalance: Imbalance factor.
        profile: ``"exp"`` or ``"step"``.

    Returns:
        ``min_c floor(available_c / r_c)``, capped by the largest pool.
    """
    ratios = profile_ratios(num_classes, imbalance, profile)
    n_max = min(min(math.floor(a / r + 1e-9) for a, r in zip(available, ratios, strict=True)), max(available))
    # Guard against float rounding: step down until every class fits.
    while n_max > 0 and any(
        n > a for n, a in zip(lt_counts(n_max, num_classes, imbalance, profile), available, strict=True)
    ):
        n_max -= 1
    return n_max


def make_lt_splits(
    labels: np.ndarray,
    num_classes: int,
    imbalance: float,
    profile: str = "exp",
    val_per_class: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a balanced training set into a long-tailed train split and a balanced val split.

    Each class's indices are shuffled with ``np.random.default_rng(seed)``; the first
    ``val_per_class`` form the validation set and the LT training images come from the rest. The head
    count n_max is the largest the pools allow: with the official CIFAR-10 (5000/class) and 20
    validation images per class it is 4980 (MetaSAug's meta set of 10 gives 4990 the same way).

    Args:
        labels: Integer labels of the source training set, shape (N,).
        num_classes: Number of classes C; labels must lie in [0, C).
        imbalance: Imbalance factor IF >= 1.
        profile: ``"exp"`` or ``"step"``.
        val_per_class: Validation images per class (>= 0).
        seed: Seed of the split.

    Returns:
        ``(train_idx, val_idx)``: sorted, disjoint int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    if val_per_class < 0:
        raise ConfigError(f"val_per_class must be >= 0, got {val_per_class}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    rng = np.random.default_rng(seed)
    pools, val = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < val_per_class + 1:
            raise DataError(
                f"class {c} has {idx.size} training images; need at least {val_per_class + 1} "
                f"({val_per_class} for validation plus one for training)"
            )
        val.append(idx[:val_per_class])
        pools.append(idx[val_per_class:])
    n_max = largest_n_max([p.size for p in pools], num_classes, imbalance, profile)
    counts = lt_counts(n_max, num_classes, imbalance, profile)
    train = [p[:n] for p, n in zip(pools, counts, strict=True)]
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)
