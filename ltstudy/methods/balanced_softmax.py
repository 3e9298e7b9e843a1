"""Balanced Softmax (Ren et al., NeurIPS 2020): cross-entropy on ``logits + tau * log n_c``.

The prior shift is applied in training only; at test time the plain logits are used. ``tau = 1`` is the
published loss; ``tau`` is exposed so a study can search the strength of the adjustment (``tau = 0``
is plain cross-entropy). Reference: jiawei-ren/BalancedMetaSoftmax-Classification (README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ltstudy.methods.image import ImageMethod, baseline_recipes
from ltstudy.methods.registry import Params, register


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, class_counts: torch.Tensor,
                          tau: float = 1.0) -> torch.Tensor:
    """Cross-entropy of ``logits + tau * log(n_c)``; classes with no sample get log(1e-6)."""
    log_prior = torch.log(class_counts.to(logits.dtype).clamp_min(1e-6))
    return F.cross_entropy(logits + tau * log_prior, y)


class BalancedSoftmaxParams(Params):
    tau: float = Field(1.0, ge=0.0, description="strength of the log-prior shift (1 = published)")


@register
class BalancedSoftmax(ImageMethod):
    name = "balanced_softmax"
    summary = "Balanced Softmax: cross-entropy on logits + tau * log n_c"
    Params = BalancedSoftmaxParams
    recipes = baseline_recipes(note="tau 1 is the published loss (jiawei-ren/BalancedMetaSoftmax-Classification "
                                    "README); ltstudy trains every baseline on the same recipe")

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return balanced_softmax_loss(logits, y, self.ctx.class_counts, self.p.tau)
