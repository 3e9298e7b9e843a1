"""A tiny, learnable long-tailed image dataset for tests and smoke runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltstudy.data.containers import LTData, split_in_memory


def _class_images(
    patterns: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, noise: float
) -> torch.Tensor:
    """Class pattern plus Gaussian pixel noise, as uint8."""
    x = patterns[labels] + noise * torch.randn(patterns[labels].shape, generator=gen)
    return x.round().clamp(0, 255).to(torch.uint8)


def make_synthetic(
    num_classes: int = 10,
    n_max: int = 200,
    imbalance: float = 10,
    image_size: int = 32,
    test_per_class: int = 20,
    val_per_class: int = 10,
    seed: int = 0,
    noise: float = 48.0,
    profile: str = "exp",
    carved: dict[str, int] | None = None,
) -> LTData:
    """Build a synthetic long-tailed dataset.

    Each class is a fixed random low-frequency colour pattern (a 4x4 colour grid upsampled
    bilinearly); every image adds Gaussian noise. A balanced pool of ``n_max + val_per_class`` (+ the
    carved sets) images per class is split exactly like CIFAR (:func:`make_lt_splits`) with head count
    ``n_max``, so every class can spare its held-out images and the training counts are
    ``lt_counts(n_max, num_classes, imbalance, profile)``.

    Args:
        num_classes: Number of classes.
        n_max: Training images of the head class.
        imbalance: Imbalance factor.
        image_size: Side of the square images.
        test_per_class: Balanced test images per class.
        val_per_class: Balanced validation images per class.
        seed: Seed of the patterns, the noise and the split.
        noise: Standard deviation of the pixel noise (0..255 scale).
        profile: ``"exp"`` or ``"step"``.
        carved: Extra balanced sets (images per class by name), carved like the validation set.
    """
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(num_classes, 3, 4, 4, generator=gen) * 200 + 28
    patterns = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train_y = torch.arange(num_classes).repeat_interleave(n_max + val_per_class + sum((carved or {}).values()))
    test_y = torch.arange(num_classes).repeat_interleave(test_per_class)
    train_x = _class_images(patterns, train_y, gen, noise)
    test_x = _class_images(patterns, test_y, gen, noise)
    mean = tuple((train_x.float() / 255).mean(dim=(0, 2, 3)).tolist())
    std = tuple((train_x.float() / 255).std(dim=(0, 2, 3)).tolist())
    names = [f"class_{c}" for c in range(num_classes)]
    return split_in_memory(
        "synthetic",
        (train_x, train_y, test_x, test_y, names),
        imbalance=imbalance,
        profile=profile,
        val_per_class=val_per_class,
        seed=seed,
        mean=mean,
        std=std,
        carved=carved,
        n_max=n_max,
    )
