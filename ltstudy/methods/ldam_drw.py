"""LDAM-DRW (Cao et al., NeurIPS 2019), after kaidic/LDAM-DRW (cifar_train.py, losses.py).

* LDAM: the true-class logit of a normalised (cosine) classifier loses a margin m_c ∝ n_c^(-1/4),
  rescaled so that the largest margin is ``max_m``; logits are multiplied by ``s``.
* DRW: per-class weights are uniform until ``drw_start`` (a fraction of the epochs; 160/200 in the
  paper), then class-balanced weights (Cui et al., 2019) w_c ∝ (1 - beta) / (1 - beta^n_c),
  normalised to sum to C.

Differences from the reference: the DRW switch is a fraction of the budget rather than an epoch index,
so short studies keep the published proportion. The step schedule's lr decays sit at the switch and
halfway from it to the end (160 and 180 of 200, as in the reference) unless ``milestones`` is set, so a
study that moves ``drw_start`` moves them with it. The reference has no ImageNet-LT recipe; on file lists
ltstudy uses the Decoupling joint-training recipe (cosine lr) with the CIFAR DRW proportion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ltstudy.methods.image import ImageMethod, baseline_recipes
from ltstudy.methods.registry import MethodContext, Params, register


def ldam_margins(class_counts: torch.Tensor, max_m: float) -> torch.Tensor:
    """m_c = n_c^(-1/4), scaled so that max_c m_c = max_m."""
    m = class_counts.double().clamp_min(1).pow(-0.25)
    return (m * (max_m / m.max())).float()


def class_balanced_weights(class_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al.'s effective-number weights (1 - beta) / (1 - beta^n_c), normalised to sum to C."""
    n = class_counts.double().clamp_min(1)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


def ldam_loss(logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor, s: float,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of s * (logits - m_y on the true class), optionally class-weighted."""
    shifted = logits - F.one_hot(y, logits.shape[1]).to(logits.dtype) * margins[y].unsqueeze(1)
    return F.cross_entropy(s * shifted, y, weight=weight)


class LDAMDRWParams(Params):
    max_m: float = Field(0.5, ge=0.0, description="largest class margin")
    s: float = Field(30.0, gt=0.0, description="logit scale")
    beta: float = Field(0.9999, ge=0.0, lt=1.0, description="class-balanced weight beta")
    drw_start: float = Field(0.8, ge=0.0, le=1.0, description="fraction of epochs before re-weighting")


@register
class LDAMDRW(ImageMethod):
    name = "ldam_drw"
    summary = "LDAM margins on a normalised classifier + deferred class-balanced re-weighting"
    Params = LDAMDRWParams
    head = "normed"
    recipes = baseline_recipes(note="max_m 0.5, s 30, beta 0.9999, DRW from 160 of 200 epochs "
                                    "(kaidic/LDAM-DRW losses.py, cifar_train.py)")

    @classmethod
    def lr_milestones(cls, params: LDAMDRWParams) -> tuple[float, ...]:
        return (params.drw_start, (1.0 + params.drw_start) / 2)

    def __init__(self, params: LDAMDRWParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        self.margins = ldam_margins(ctx.class_counts, params.max_m).to(ctx.device)
        self.cb_weights = class_balanced_weights(ctx.class_counts, params.beta).to(ctx.device)
        (self.drw_epoch,) = self.phase_epochs(params, ctx.epochs)
        self.weight: torch.Tensor | None = None

    @classmethod
    def phase_epochs(cls, params: LDAMDRWParams, epochs: int) -> list[int]:
        return [int(params.drw_start * epochs)]

    def on_epoch_start(self, epoch: int) -> None:
        self.weight = self.cb_weights if epoch >= self.drw_epoch else None

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ldam_loss(logits, y, self.margins, self.p.s, self.weight)
