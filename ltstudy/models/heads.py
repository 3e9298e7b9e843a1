"""Classifier heads mapping a pooled feature (B, D) to logits (B, C)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LinearHead", "NormedHead", "CosineHead", "ScaledCosineHead"]


class LinearHead(nn.Linear):
    """A plain affine classifier, ``x @ W.T + b``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True) -> None:
        super().__init__(in_features, num_classes, bias=bias)


class NormedHead(nn.Module):
    """LDAM's NormedLinear: the cosine between ``x`` and each class weight column.

    ``logits = normalize(x, dim=1) @ normalize(W, dim=0)`` with ``W`` of shape (D, C); the
    output lies in [-1, 1]. There is no scale here: the loss (LDAM's ``s``) applies it.
    Weights are drawn from U(-1, 1) and each class column is rescaled to unit norm.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.copy_(F.normalize(self.weight, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class CosineHead(nn.Module):
    """Cosine classifier with a learnable scale (TailCalibX's CosineDotProduct).

    ``logits = softplus(s) * cos(x, w_c) + b_c`` with ``s`` initialised to ``scale_init`` (10).

    Deviation from the reference: TailCalibX normalises the transposed weight along dim 1, so
    each *feature dimension* has unit norm across classes. ltstudy deliberately normalises each
    *class* weight vector ``w_c`` instead, which makes the product a true cosine similarity.
    """

    def __init__(self, in_features: int, num_classes: int, scale_init: float = 10.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.s = nn.Parameter(torch.tensor(float(scale_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.bias)

    @property
    def scale(self) -> torch.Tensor:
        """The effective scale ``softplus(s)``."""
        return F.softplus(self.s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()
        return F.softplus(self.s) * cos + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


class ScaledCosineHead(nn.Module):
    """LIFT's CosineClassifier: ``scale * cos(x, w_c)``, a fixed scale (25 in LIFT's config), no bias.

    The scale is a buffer, so it travels with the state dict. Rows start on the unit sphere (LIFT draws
    U(-1, 1) and renormalises each class vector); :meth:`set_weight` puts given class vectors there (text
    features, class means).
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 25.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.register_buffer("scale", torch.tensor(float(scale)))
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.copy_(F.normalize(self.weight, dim=1))

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight.copy_(F.normalize(weight.to(self.weight), dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1)) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={float(self.scale):g}"
