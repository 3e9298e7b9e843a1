"""A pretrained model's own preprocessing, applied by the data pipeline: its resolution, mean / std,
interpolation and evaluation crop, and test-time crops.

A backbone from timm or open_clip (``ltstudy.models.pretrained``) declares a :class:`Preprocess`; the
loaders then produce batches at that size, normalised with its statistics. In-memory data (CIFAR) stays
at its own resolution on the device and is resized there, a whole batch at once (:func:`train_views`,
:func:`eval_views`); file lists are decoded at the model's size by the dataset's transform
(``ltstudy.data.filelist.make_transform``). Without a ``Preprocess`` (ltstudy's own ResNets) nothing here
runs: images keep their size and the dataset's statistics.

Evaluation resizes the image's shorter side to ``size / crop_pct`` and takes the centre ``size`` crop
(timm's ``crop_pct``; 1.0 is open_clip's resize-and-centre-crop). With ``eval_crops = 5`` (LIFT's
test-time ensemble) the image is resized to ``size + expand`` and its four corner crops and centre crop are
the views whose logits the trainer averages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: torchvision's RandomResizedCrop defaults (the crop of every ImageNet-style training recipe)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images.

    Attributes:
        size: Side of the (square) input.
        mean: Per-channel mean of the inputs in [0, 1].
        std: Per-channel standard deviation.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
        crop_pct: Evaluation: the shorter side is resized to ``size / crop_pct``, then centre-cropped.
        eval_crops: 1 (the centre crop) or 5 (four corners and the centre of the image resized to
            ``size + expand``; the trainer averages their logits).
        expand: Pixels added to ``size`` before the five crops.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    eval_crops: int = 1
    expand: int = 24

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of {INTERPOLATIONS}")
        if self.eval_crops not in (1, 5):
            raise ValueError(f"eval_crops must be 1 or 5, got {self.eval_crops}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def resize_side(self) -> int:
        """The shorter side before the evaluation crop(s)."""
        if self.eval_crops == 5:
            return self.size + self.expand
        return int(math.floor(self.size / self.crop_pct))

    def describe(self) -> dict[str, object]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "eval_crops": self.eval_crops,
                "expand": self.expand}


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Float (N, C, H, W) in [0, 1] resized; antialiased when shrinking (as PIL and torchvision are)."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    kw = {"align_corners": False} if mode != "nearest" else {}
    out = F.interpolate(x, size=size, mode=mode, antialias=shrink and mode != "nearest", **kw)
    return out.clamp_(0.0, 1.0) if mode == "bicubic" else out


def _shorter_side(h: int, w: int, side: int) -> tuple[int, int]:
    if h <= w:
        return side, max(1, int(round(w * side / h)))
    return max(1, int(round(h * side / w))), side


def _centre(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def eval_views(x: torch.Tensor, pre: Preprocess) -> list[torch.Tensor]:
    """Evaluation views of a float batch in [0, 1]: the centre crop, or the five crops (top-left, top-right,
    bottom-left, bottom-right, centre: torchvision's ``FiveCrop`` order)."""
    h, w = x.shape[-2:]
    resized = _resize(x, _shorter_side(h, w, pre.resize_side), pre.interpolation)
    s = pre.size
    if pre.eval_crops == 1:
        return [_centre(resized, s)]
    rh, rw = resized.shape[-2:]
    return [resized[..., :s, :s], resized[..., :s, rw - s:], resized[..., rh - s:, :s],
            resized[..., rh - s:, rw - s:], _centre(resized, s)]


def random_resized_crop(x: torch.Tensor, size: int | None = None, generator: torch.Generator | None = None,
                        interpolation: str = "bilinear", scale: Sequence[float] = RRC_SCALE,
                        ratio: Sequence[float] = RRC_RATIO, attempts: int = 10) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` for a whole float batch on its device, one box per image.

    Each image draws ``attempts`` (area fraction, aspect ratio) pairs as torchvision does, keeps the first
    box that fits, and falls back to the centre crop with the ratio clamped into ``ratio``; the boxes are
    then sampled into ``size`` x ``size`` by one ``grid_sample`` (``interpolation``), so there is no
    per-image Python loop. ``size`` defaults to the input side.
    """
    n, _, h, w = x.shape
    out = size or h
    dev = x.device
    area = h * w
    frac = torch.empty(n, attempts, device=dev).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                          generator=generator)
    r = torch.exp(log_r)
    cw = torch.round(torch.sqrt(area * frac * r))
    ch = torch.round(torch.sqrt(area * frac / r))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=dev))
    # the fallback: the whole image with the ratio clamped, centred
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = h, int(round(h * ratio[1]))
    else:
        fw, fh = w, h
    rows = torch.arange(n, device=dev)
    pick = first.clamp_min(0)
    bw = torch.where(first >= 0, cw[rows, pick], torch.full((n,), float(fw), device=dev))
    bh = torch.where(first >= 0, ch[rows, pick], torch.full((n,), float(fh), device=dev))
    u1 = torch.rand(n, device=dev, generator=generator)
    u2 = torch.rand(n, device=dev, generator=generator)
    top = torch.where(first >= 0, torch.floor(u1 * (h - bh + 1)), torch.floor((h - bh) / 2))
    left = torch.where(first >= 0, torch.floor(u2 * (w - bw + 1)), torch.floor((w - bw) / 2))
    # normalised [-1, 1] coordinates (align_corners=False): pixel edges at -1 and 1
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
    y = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return y.clamp_(0.0, 1.0) if interpolation == "bicubic" else y


def train_resize(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Training without a random resized crop: the whole image resized to the model's side."""
    return _resize(x, (pre.size, pre.size), pre.interpolation)
