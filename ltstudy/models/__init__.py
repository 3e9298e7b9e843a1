"""Backbones, classifier heads and a registry that joins them.

ltstudy's own backbones are pure torch/torchvision: ``forward_features(x) -> (B, D, H, W)``,
``forward(x) -> (B, D)``, ``feature_dim`` and ``stages`` (ordered residual stages). Pretrained backbones
from timm and open_clip (``timm:NAME``, ``open_clip:ARCH/TAG``; :mod:`ltstudy.models.pretrained`) add
their preprocessing and an ``extract`` method; those libraries are imported only when such a model is
named, so a ResNet run never loads them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ltstudy.errors import ConfigError
from ltstudy.models.heads import CosineHead, LinearHead, NormedHead, ScaledCosineHead
from ltstudy.models.imagenet import TorchvisionResNet, resnet50, resnext50_32x4d
from ltstudy.models.resnet_cifar import CifarResNet, resnet32, resnet32_w4, resnet34_cifar
from ltstudy.models.weights import is_pretrained_name, local_weights

__all__ = [
    "Classifier",
    "CifarResNet",
    "TorchvisionResNet",
    "LinearHead",
    "NormedHead",
    "CosineHead",
    "ScaledCosineHead",
    "build_model",
    "build_backbone",
    "build_head",
    "is_pretrained_name",
    "known_model",
    "list_models",
    "list_heads",
    "param_count",
    "plain_batchnorm",
]

_BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "resnet32": resnet32,
    "resnet32_w4": resnet32_w4,
    "resnet34_cifar": resnet34_cifar,
    "resnet50": resnet50,
    "resnext50_32x4d": resnext50_32x4d,
}

_HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": LinearHead,
    "normed": NormedHead,
    "cosine": CosineHead,
    "scaled_cosine": ScaledCosineHead,
}


class Classifier(nn.Module):
    """A backbone followed by a head: ``forward(x) = head(backbone(x))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim: int = int(backbone.feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, D)."""
        return self.backbone(x)

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from pooled features."""
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def preprocess(self):
        """The backbone's own preprocessing (``ltstudy.data.Preprocess``), None for ltstudy's ResNets."""
        return getattr(self.backbone, "preprocess", None)


def list_models() -> list[str]:
    """ltstudy's own backbones; :func:`build_model` also takes ``timm:NAME`` and ``open_clip:ARCH/TAG``."""
    return list(_BACKBONES)


def known_model(name: str) -> bool:
    """Whether ``name`` is one of ltstudy's backbones or a timm / open_clip name (checked when built)."""
    return name in _BACKBONES or is_pretrained_name(name)


def list_heads() -> list[str]:
    """Head names accepted by :func:`build_model`."""
    return list(_HEADS)


def _choices(names: list[str]) -> str:
    return ", ".join(names)


def build_backbone(name: str, *, pretrained: str | None = None, model_kwargs: dict | None = None,
                   weights_cache: str | None = None) -> nn.Module:
    """A backbone by name; unknown names raise :class:`ConfigError`.

    ltstudy's backbones are randomly initialised. A ``timm:`` / ``open_clip:`` backbone loads the weights
    ``pretrained`` names (a local file, or a hub tag already fetched into ``weights_cache``; see
    :mod:`ltstudy.models.weights`), with ``model_kwargs`` for the library's constructor.
    """
    if is_pretrained_name(name):
        from ltstudy.models.pretrained import build_pretrained

        return build_pretrained(name, local_weights(name, pretrained, weights_cache), model_kwargs)
    if model_kwargs:
        raise ConfigError(f"model_kwargs apply to timm: and open_clip: models, not to {name!r}")
    try:
        factory = _BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of: {_choices(list_models())}, "
                          "timm:NAME or open_clip:ARCH/TAG") from None
    return factory()


def build_head(name: str, in_features: int, num_classes: int) -> nn.Module:
    """A classifier head by name; unknown names raise :class:`ConfigError`."""
    try:
        factory = _HEADS[name]
    except KeyError:
        raise ConfigError(f"unknown head {name!r}; choose one of: {_choices(list_heads())}") from None
    return factory(in_features, num_classes)


def build_model(name: str, num_classes: int, head: str = "linear", **backbone_options) -> Classifier:
    """Backbone ``name`` (with :func:`build_backbone`'s ``backbone_options``) with a ``head`` classifier over
    ``num_classes`` classes."""
    if head not in _HEADS:  # check before building a possibly large backbone
        raise ConfigError(f"unknown head {head!r}; choose one of: {_choices(list_heads())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    backbone = build_backbone(name, **backbone_options)
    return Classifier(backbone, build_head(head, int(backbone.feature_dim), num_classes))


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every SyncBatchNorm replaced by a plain BatchNorm2d of the same names.

    For ``torch.func.functional_call`` with the original's parameters and buffers: SyncBatchNorm's backward
    is not twice differentiable, so second-order code (MetaSAug's look-ahead) runs on this twin, which
    normalises with the local batch statistics.
    """
    twin = copy.deepcopy(module)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.SyncBatchNorm):
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device if child.affine else None)
                bn.load_state_dict(child.state_dict())
                bn.train(child.training)
                setattr(parent, name, bn)
            else:
                swap(child)

    swap(twin)
    return twin
