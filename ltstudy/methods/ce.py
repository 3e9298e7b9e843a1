"""Cross-entropy (ERM): the plain baseline, trained with the LDAM-DRW recipe on CIFAR (Cao et al., 2019) and
the Decoupling joint-training recipe on ImageNet-LT (Kang et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltstudy.methods.image import ImageMethod, baseline_recipes
from ltstudy.methods.registry import Params, register


class CEParams(Params):
    """Plain cross-entropy has no hyperparameters of its own."""


@register
class CrossEntropy(ImageMethod):
    name = "ce"
    summary = "cross-entropy on the long-tailed data (the ERM baseline)"
    Params = CEParams
    recipes = baseline_recipes()

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)
