"""Per-sample weights for re-sampling and the per-epoch sample order."""

from __future__ import annotations

import numpy as np
import torch

from ltstudy.errors import ConfigError

SAMPLERS = ("instance", "class_balanced", "sqrt", "power")


def sample_weights(
    labels: torch.Tensor | np.ndarray,
    class_counts: torch.Tensor | np.ndarray,
    kind: str = "instance",
    q: float = 0.5,
) -> torch.Tensor | None:
    """Per-sample drawing weights proportional to ``n_y ** -q``.

    Args:
        labels: Labels of the samples, shape (N,).
        class_counts: Training count of each class, shape (C,).
        kind: ``"instance"`` (None: plain shuffle), ``"class_balanced"`` (q=1), ``"sqrt"`` (q=0.5)
            or ``"power"`` (uses ``q``).
        q: Exponent for ``"power"``.

    Returns:
        float64 weights of shape (N,), or None for instance sampling.
    """
    exponents = {"instance": None, "class_balanced": 1.0, "sqrt": 0.5, "power": q}
    if kind not in exponents:
        raise ConfigError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
    if kind == "instance":
        return None
    labels = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.as_tensor(class_counts, dtype=torch.float64).clamp(min=1.0)
    return counts.pow(-float(exponents[kind]))[labels]


def epoch_order(n: int, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Sample order of one epoch: a permutation, or ``n`` weighted draws with replacement."""
    if weights is None:
        return torch.randperm(n, generator=generator)
    return torch.multinomial(weights, n, replacement=True, generator=generator)
