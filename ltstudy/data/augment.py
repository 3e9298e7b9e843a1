"""Whole-batch tensor augmentation on the device (no per-image Python loops, no PIL).

Every random function takes an explicit ``torch.Generator`` living on the tensor's device, so a
batch's augmentation is a function of the generator state alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ltstudy.data.preprocess import Preprocess, eval_views, random_resized_crop, train_resize


def _source_index(i: torch.Tensor, n: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map padded coordinates ``i`` (may fall outside [0, n)) to source pixels; zeros mode also gives the mask."""
    if mode == "reflect":  # numpy/torch 'reflect': the border pixel is not repeated
        i = i.abs()
        return torch.where(i >= n, 2 * (n - 1) - i, i), None
    inside = (i >= 0) & (i < n)
    return i.clamp(0, n - 1), inside


def random_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                mode: str = "zeros") -> torch.Tensor:
    """Pad by ``padding`` and crop each sample back to (H,W) at its own random offset.

    Args:
        x: Batch (N,C,H,W) of any dtype.
        padding: Pixels of padding per side; 0 returns ``x``.
        generator: Generator on ``x.device``.
        mode: ``"zeros"`` (torchvision's RandomCrop(padding=4)) or ``"reflect"`` (a reflection of the
            border, MetaSAug's CIFAR pipeline); the padded image is never built, each crop gathers its
            pixels from ``x``.
    """
    if padding <= 0:
        return x
    if mode not in ("zeros", "reflect"):
        raise ValueError(f"unknown padding mode {mode!r}")
    n, c, h, w = x.shape
    if mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} needs images larger than it, got {h}x{w}")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    rows, row_in = _source_index(dy[:, None] + torch.arange(h, device=x.device) - padding, h, mode)
    cols, col_in = _source_index(dx[:, None] + torch.arange(w, device=x.device) - padding, w, mode)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = x[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    if mode == "zeros":
        keep = row_in[:, None, :, None] & col_in[:, None, None, :]
        out = out * keep.to(out.dtype)
    return out


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(x: torch.Tensor, size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square (clipped at the border) centred anywhere in each sample.

    Args:
        x: Batch (N,C,H,W).
        size: Side of the square; 0 returns ``x``.
        generator: Generator on ``x.device``.
    """
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n, 1), generator=generator, device=x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= cy - size // 2) & (ys < cy - size // 2 + size)  # (N,H)
    in_x = (xs >= cx - size // 2) & (xs < cx - size // 2 + size)  # (N,W)
    hole = in_y[:, None, :, None] & in_x[:, None, None, :]
    return x.masked_fill(hole, 0)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 (N,C,H,W) in [0,255] -> float32 ``(x/255 - mean) / std``.

    ``mean``/``std`` may be tensors already on ``x.device`` (loaders pass those to avoid a copy).
    """
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x.to(torch.float32) / 255.0 - m) / s


def autoaugment(x: torch.Tensor, generator: torch.Generator | None = None, chunks: int = 8) -> torch.Tensor:
    """AutoAugment (CIFAR-10 policy) on ``chunks`` slices of a uint8 batch.

    Trade-off: torchvision applies one sampled sub-policy to a whole batched tensor, so each chunk
    shares its sub-policy (operations, magnitudes and signs) instead of drawing one per image. With
    8 chunks of a shuffled batch the variety is close to per-image policies at a fraction of the
    cost. torchvision draws from the global CPU RNG, which is forked and seeded from ``generator``.
    """
    from torchvision.transforms import v2  # only here: torchvision costs every process about 2 s

    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return torch.cat([policy(part) for part in x.chunk(chunks)])


@dataclass(frozen=True)
class AugmentSpec:
    """Which batch augmentations a training loader applies.

    Attributes:
        crop_padding: Padding of the random crop (0 = no crop).
        flip: Random horizontal flip.
        cutout: Side of the cutout square (0 = off).
        autoaugment: AutoAugment CIFAR-10 policy, chunk-wise.
        pad_mode: ``"zeros"`` or ``"reflect"`` padding of the random crop.
        color: File lists: MoCo-v2 colour jitter, grayscale and blur after the random resized crop (applied
            per image by the dataset's transform).
        resized_crop: In-memory data: torchvision's random resized crop (scale 0.08-1, ratio 3/4-4/3) on the
            device, to the model's side when it declares a ``Preprocess`` (file lists always crop this way).
    """

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    autoaugment: bool = False
    pad_mode: str = "zeros"
    color: bool = False
    resized_crop: bool = False

    @classmethod
    def of(cls, settings: object) -> AugmentSpec:
        """The augmentation a trial's settings (a ``TrainConfig``) ask for."""
        return cls(crop_padding=settings.crop_padding, flip=settings.flip, cutout=settings.cutout,
                   autoaugment=settings.autoaugment, pad_mode=settings.crop_pad_mode,
                   color=settings.color_augment, resized_crop=getattr(settings, "random_resized_crop", False))


def apply(
    spec: AugmentSpec,
    x: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    generator: torch.Generator | None = None,
    pre: Preprocess | None = None,
) -> torch.Tensor:
    """Augment a uint8 batch and normalise it to float32.

    Order as in the reference CIFAR pipelines: AutoAugment, crop, flip, normalise, then cutout
    (applied after normalisation, so the hole is zero in normalised space, as in DeVries & Taylor).
    With a model's ``pre`` (or ``spec.resized_crop``) the batch is brought to the model's side after the
    padded crop: by a random resized crop, or by resizing the whole image, with the model's interpolation.
    """
    if spec.autoaugment:
        x = autoaugment(x, generator)
    x = random_crop(x, spec.crop_padding, generator, spec.pad_mode)
    if pre is None and not spec.resized_crop:
        if spec.flip:
            x = random_flip(x, generator)
        return cutout(normalize(x, mean, std), spec.cutout, generator)
    x = x.to(torch.float32) / 255.0
    if spec.resized_crop:
        x = random_resized_crop(x, pre.size if pre else None, generator,
                                pre.interpolation if pre else "bilinear")
    elif pre is not None:
        x = train_resize(x, pre)
    if spec.flip:
        x = random_flip(x, generator)
    return cutout(standardize(x, mean, std), spec.cutout, generator)


def standardize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Float (N,C,H,W) in [0,1] -> ``(x - mean) / std``."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return (x - m) / s


def eval_batch(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
               pre: Preprocess | None = None) -> list[torch.Tensor]:
    """The evaluation views of a uint8 batch, normalised: the batch itself without a model preprocessing,
    else the model's centre crop (or its five crops)."""
    if pre is None:
        return [normalize(x, mean, std)]
    return [standardize(v, mean, std) for v in eval_views(x.to(torch.float32) / 255.0, pre)]
