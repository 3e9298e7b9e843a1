"""Long-tailed class-count profiles (exponential and step), class 0 being the head."""

from __future__ import annotations

import math

from ltstudy.errors import ConfigError

PROFILES = ("exp", "step")
_EPS = 1e-9  # keeps exact integers (e.g. 500 * 0.01 = 5) from flooring to one less


def profile_ratios(num_classes: int, imbalance: float, profile: str = "exp") -> list[float]:
    """Fraction of ``n_max`` that each class keeps under a profile.

    Args:
        num_classes: Number of classes C (>= 1).
        imbalance: Imbalance factor IF = n_max / n_min (>= 1).
        profile: ``"exp"`` (r_i = IF^(-i/(C-1))) or ``"step"`` (first floor(C/2) classes 1, rest 1/IF).

    Returns:
        One ratio per class, head first.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if not imbalance >= 1:
        raise ConfigError(f"imbalance factor must be >= 1 (IF = n_max / n_min), got {imbalance}")
    if profile == "exp":
        if num_classes == 1:
            return [1.0]
        return [imbalance ** (-i / (num_classes - 1)) for i in range(num_classes)]
    if profile == "step":
        head = num_classes // 2
        return [1.0 if i < head else 1.0 / imbalance for i in range(num_classes)]
    raise ConfigError(f"unknown imbalance profile {profile!r}; choose one of {', '.join(PROFILES)}")


def lt_counts(n_max: int, num_classes: int, imbalance: float, profile: str = "exp") -> list[int]:
    """Per-class training counts of a long-tailed split.

    Args:
        n_max: Count of the head class (class 0).
        num_classes: Number of classes C.
        imbalance: Imbalance factor IF = n_max / n_min (>= 1).
        profile: ``"exp"`` or ``"step"``.

    Returns:
        ``floor(n_max * r_i)`` for each class i, head first.
    """
    if n_max < 0:
        raise ConfigError(f"n_max must be >= 0, got {n_max}")
    return [math.floor(n_max * r + _EPS) for r in profile_ratios(num_classes, imbalance, profile)]
