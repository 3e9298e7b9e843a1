"""Cross-entropy (ERM): the plain baseline, trained with the LDAM-DRW recipe (Cao et al., 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ltstudy.methods.image import ImageMethod
from ltstudy.methods.registry import Params, register


class CEParams(Params):
    """Plain cross-entropy has no hyperparameters of its own."""


@register
class CrossEntropy(ImageMethod):
    name = "ce"
    summary = "cross-entropy on the long-tailed data (the ERM baseline)"
    Params = CEParams

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)
