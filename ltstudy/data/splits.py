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
    carved: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Split a balanced training set into a long-tailed train split, a balanced val split and carved sets.

    Each class's indices are shuffled with ``np.random.default_rng(seed)``; the first
    ``val_per_class`` form the validation set, the next ones the ``carved`` sets (``{name: per class}``,
    in name order, e.g. MetaSAug's meta set), and the LT training images come from the rest. The head
    count n_max is the largest the pools allow: with the official CIFAR-10 (5000/class) and 20
    validation images per class it is 4980.

    Args:
        labels: Integer labels of the source training set, shape (N,).
        num_classes: Number of classes C; labels must lie in [0, C).
        imbalance: Imbalance factor IF >= 1.
        profile: ``"exp"`` or ``"step"``.
        val_per_class: Validation images per class (>= 0).
        seed: Seed of the split.
        carved: Extra balanced sets, images per class by name.

    Returns:
        ``(train_idx, val_idx, carved_idx)``: sorted, disjoint int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    carved = dict(sorted((carved or {}).items()))
    if val_per_class < 0 or any(n < 0 for n in carved.values()):
        raise ConfigError(f"images per class must be >= 0: val_per_class={val_per_class}, carved={carved}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    held = val_per_class + sum(carved.values())
    rng = np.random.default_rng(seed)
    pools, val = [], []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in carved}
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if idx.size < held + 1:
            extra = "".join(f" + {n} {name}" for name, n in carved.items())
            raise DataError(
                f"class {c} has {idx.size} training images; need at least {held + 1} "
                f"({val_per_class} for validation{extra} plus one for training)"
            )
        val.append(idx[:val_per_class])
        start = val_per_class
        for name, n in carved.items():
            parts[name].append(idx[start:start + n])
            start += n
        pools.append(idx[start:])
    n_max = largest_n_max([p.size for p in pools], num_classes, imbalance, profile)
    counts = lt_counts(n_max, num_classes, imbalance, profile)
    train = [p[:n] for p, n in zip(pools, counts, strict=True)]

    def joined(chunks: list[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(chunks)).astype(np.int64)

    return joined(train), joined(val), {name: joined(chunks) for name, chunks in parts.items()}
