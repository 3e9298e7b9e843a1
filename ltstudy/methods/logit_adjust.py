"""Logit adjustment (Menon, Jayasumana, Rawat, Jain, Veit, Kumar; ICLR 2021, "Long-tail learning via logit
adjustment"), after google-research/google-research ``logit_adjustment/`` (``utils.build_loss_fn``,
``main.py``): as a loss (``logit_adjust``) and post hoc on any trained model (``logit_adjust_posthoc``).

With the training prior π_c = n_c / N:

* **the loss**: cross-entropy on ``logits + log(π^τ + 1e-12)`` in training, the plain logits at test time
  (τ = 1 in the paper). With τ = 1 it is Balanced Softmax's loss (``balanced_softmax``) up to the 1e-12,
  since softmax ignores the constant log N; the method carries Menon et al.'s own CIFAR recipe.
* **post hoc**: ``logits - log(π^τ + 1e-12)`` applied to a trained classifier's logits. On the feature cache
  this is the backbone's own classifier (``head.pt``) on the cached features: no training, so any trained
  backbone (``backbone=CHECKPOINT``) is adjusted; τ is chosen on the validation split from a grid
  (``select=validation``) or fixed (``select=fixed``, e.g. tuned by a study, which also selects on val).

The recipes are the reference's (``utils.dataset_mappings``, ``models.py``): ResNet-32, SGD lr 0.1, momentum
0.9, Nesterov, batch 128, L2 1e-4 on every kernel (Keras' ``l2(1e-4)`` adds 1e-4·||w||² to the loss, i.e. a
weight decay of 2e-4), CIFAR-10-LT 1,241 epochs (linear warm-up to epoch 20, lr x0.1 at 604, 926 and 1,128),
CIFAR-100-LT 1,419 epochs (warm-up 22, x0.1 at 691, 1,059, 1,290). Differences: ltstudy warms up per epoch
(the reference per step) and its ResNet-32 is ltstudy's (projection shortcuts; the reference's block is a
three-convolution bottleneck at widths 16/32/64). The reference ships no ImageNet-LT command; on file lists
the loss uses the baselines' Decoupling joint-training recipe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ltstudy.methods.feature import PostHocMethod, SelectParams
from ltstudy.methods.image import DECOUPLING_IMAGENET, DECOUPLING_SOURCE, LDAM_CIFAR, ImageMethod
from ltstudy.methods.registry import Params, Recipe, register


def log_prior(class_counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``log(π^τ + 1e-12)`` with π the training prior n_c / N (the reference's base probabilities)."""
    prior = class_counts.double() / class_counts.sum().double()
    return torch.log(prior ** tau + 1e-12).float()


def logit_adjusted_loss(logits: torch.Tensor, y: torch.Tensor, class_counts: torch.Tensor,
                        tau: float = 1.0) -> torch.Tensor:
    """Cross-entropy of ``logits + log(π^τ + 1e-12)``."""
    return F.cross_entropy(logits + log_prior(class_counts, tau).to(logits.device, logits.dtype), y)


def posthoc_adjust(logits: torch.Tensor, class_counts: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``logits - log(π^τ + 1e-12)``: a classifier trained on the long-tailed prior, adjusted for a balanced one."""
    return logits - log_prior(class_counts, tau).to(logits.device, logits.dtype)


def _milestones(epochs: int, *at: int) -> tuple[float, ...]:
    # fractions a half epoch past each decay epoch, so int(fraction * epochs) is the epoch itself
    return tuple((e + 0.5) / epochs for e in at)


_CIFAR_COMMON = {**LDAM_CIFAR, "nesterov": True, "weight_decay": 2e-4, "gamma": 0.1, "lr": 0.1, "batch_size": 128,
                 "tau": 1.0}
_CIFAR10 = {**_CIFAR_COMMON, "epochs": 1241, "warmup_epochs": 20, "milestones": _milestones(1241, 604, 926, 1128)}
_CIFAR100 = {**_CIFAR_COMMON, "epochs": 1419, "warmup_epochs": 22, "milestones": _milestones(1419, 691, 1059, 1290)}
_SOURCE = ("google-research logit_adjustment (utils.dataset_mappings, models.py): ResNet-32, SGD lr 0.1 momentum "
           "0.9 Nesterov, batch 128, L2 1e-4 (weight decay 2e-4), tau 1; ")


class LogitAdjustParams(Params):
    tau: float = Field(1.0, ge=0.0, description="power of the prior in the adjustment log(pi^tau) (1 = published)")


@register
class LogitAdjust(ImageMethod):
    name = "logit_adjust"
    summary = "logit-adjusted loss: cross-entropy on logits + log(pi^tau) (Menon et al. 2021)"
    Params = LogitAdjustParams
    recipes = {
        "cifar10": Recipe(_CIFAR10, _SOURCE + "CIFAR-10-LT 1241 epochs, warm-up 20, lr x0.1 at 604, 926, 1128"),
        "cifar100": Recipe(_CIFAR100, _SOURCE + "CIFAR-100-LT 1419 epochs, warm-up 22, lr x0.1 at 691, 1059, 1290"),
        "imagenet": Recipe({**DECOUPLING_IMAGENET, "tau": 1.0}, "no ImageNet-LT command in the reference; the "
                           "baselines' " + DECOUPLING_SOURCE + "; tau 1"),
    }

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, y, self.ctx.class_counts, self.p.tau)


# ----------------------------------------------------------------------------------- post hoc (features)
_POSTHOC = {"epochs": 1, "warmup_epochs": 0, "schedule": "constant", "select": "validation", "tau": 1.0,
            "tau_max": 2.0, "tau_step": 0.1}


@register
class LogitAdjustPostHoc(PostHocMethod):
    name = "logit_adjust_posthoc"
    summary = "post-hoc logit adjustment of a trained classifier: logits - log(pi^tau), tau chosen on val"
    Params = SelectParams
    recipes = {family: Recipe(_POSTHOC, "google-research logit_adjustment main.py --mode=posthoc (logits - "
                              "log(pi^tau + 1e-12)); the paper tunes tau on a holdout: ltstudy picks it on the "
                              "validation split from 0, 0.1, ..., 2 (select=fixed: tau as given)")
               for family in ("cifar10", "cifar100", "imagenet")}

    def rule(self, tau: float) -> Any:
        head, counts = self.feats.head, self.feats.class_counts
        return lambda x: posthoc_adjust(head(x), counts, tau)
