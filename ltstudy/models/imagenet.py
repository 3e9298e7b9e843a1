"""torchvision ResNet-50 / ResNeXt-50 (32x4d) wrapped to the ltstudy backbone interface.

Weights are never downloaded (``weights=None``); torchvision's ``fc`` is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # torchvision is imported when such a backbone is built: it costs a process about 2 s
    from torchvision.models import ResNet

__all__ = ["TorchvisionResNet", "resnet50", "resnext50_32x4d"]


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its ``fc``: 7x7 stride-2 stem + max-pool, four stages."""

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.feature_dim: int = net.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map (B, D, H, W)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature (B, D)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_features(x), 1), 1)


def resnet50() -> TorchvisionResNet:
    """torchvision ResNet-50, randomly initialised; 2048-d feature."""
    from torchvision.models import resnet50 as factory

    return TorchvisionResNet(factory(weights=None))


def resnext50_32x4d() -> TorchvisionResNet:
    """torchvision ResNeXt-50 32x4d, randomly initialised; 2048-d feature."""
    from torchvision.models import resnext50_32x4d as factory

    return TorchvisionResNet(factory(weights=None))
