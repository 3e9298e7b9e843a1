"""CIFAR-style ResNets: 3x3 stride-1 stem, no max-pool, global average pooling.

Shortcut choice: where a block changes width or resolution, the shortcut is a 1x1 convolution
followed by BatchNorm (He et al.'s option B). The LDAM/MetaSAug reference ResNet-32 uses the
parameter-free zero-padding shortcut (option A) instead; the projection adds 2,752 parameters to
ResNet-32 (0.467M instead of 0.464M with a 10-class head) and behaves identically under
``channels_last``, ``SyncBatchNorm`` conversion and ``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet32", "resnet32_w4", "resnet34_cifar"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet backbone for 32x32 inputs.

    ``forward_features`` returns the last stage's map (B, D, H, W); ``forward`` returns the
    globally average-pooled feature (B, D). ``stages`` lists the residual stages in order so that a
    method can hook the last or second-last one (e.g. for Grad-CAM).
    """

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], in_channels: int = 3) -> None:
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError("blocks and widths must be non-empty and of equal length")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, width, stride if j == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.feature_dim: int = in_planes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map (B, D, H, W)."""
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature (B, D)."""
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)


def resnet32() -> CifarResNet:
    """He et al.'s CIFAR ResNet-32: 3 stages x 5 BasicBlocks, widths 16/32/64, 64-d feature."""
    return CifarResNet([5, 5, 5], [16, 32, 64])


def resnet32_w4() -> CifarResNet:
    """ResNet-32 with 4x channels (64/128/256), GLMC/FSGL's "ResNet-32 channel x4"; 256-d feature."""
    return CifarResNet([5, 5, 5], [64, 128, 256])


def resnet34_cifar() -> CifarResNet:
    """ResNet-34 layout [3,4,6,3], widths 64..512, CIFAR stem (FSGL's ``resnet34``); 512-d feature."""
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512])
