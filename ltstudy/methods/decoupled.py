"""The decoupled classifier baselines of Kang, Xie, Rohrbach, Yan, Gordo, Feng, Kalantidis, "Decoupling
Representation and Classifier for Long-Tailed Recognition", ICLR 2020, after
facebookresearch/classifier-balancing (``config/*/cls_crt.yaml``, ``cls_lws.yaml``,
``models/TauNormClassifier.py``, ``tau_norm.py``): all three work on the frozen representation, i.e. on the
feature cache of a backbone trained with instance sampling.

* ``crt`` — classifier re-training: a re-initialised linear classifier trained with class-balanced sampling.
* ``tau_norm`` — τ-normalisation, post hoc: ``w̃_c = w_c / ||w_c||^τ`` for the rows of the backbone's linear
  classifier, logits ``x @ w̃ᵀ`` without the bias (``tau_norm.py``'s ``dotproduct_similarity``); τ chosen on
  the validation split from the reference's grid 0, 0.1, …, 2 (``np.linspace(0, 2, 21)``), or fixed.
* ``lws`` — learnable weight scaling: the backbone's classifier frozen, its logits (bias included) multiplied
  by a learnt per-class scale ``f_c`` (``TauNormClassifier.DotProduct_Classifier``: ``fc(x) * scales``, scales
  initialised to 1), trained with class-balanced sampling.

Recipes (``ltstudy methods -m crt``): the reference's ImageNet-LT, Places-LT and iNaturalist 2018 configs (SGD
momentum 0.9, cosine to 0, no warm-up); CIFAR-LT has no config there and uses the ImageNet-LT one.

Where ltstudy differs, and why:

* **Sampling.** The reference's ``ClassAwareSampler`` cycles through the classes and takes 4 images of each
  in a row; ltstudy draws each sample with probability ∝ 1/n_c (``sampler=class_balanced``, with
  replacement, N draws per epoch): the same class-balanced distribution without the runs of 4.
* **Selection.** The reference prints τ-norm's test accuracy for every τ of the grid (and picks by eye on
  val); ltstudy picks on val (ties: the smaller τ) and reports test once. A study can instead fix τ
  (``select=fixed``) and tune it, selecting on val too.
* **Features.** The reference re-runs the frozen backbone on augmented images every epoch; ltstudy trains on
  the cached eval-transform features (as every feature method here does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ltstudy.data.samplers import sample_weights
from ltstudy.errors import ConfigError
from ltstudy.methods.ce_classifier import CEClassifier, CEClassifierParams
from ltstudy.methods.feature import FeatureMethod, FeatureSet, PostHocMethod, SelectParams, minibatches
from ltstudy.methods.registry import Params, Recipe, register
from ltstudy.models import LinearHead

_REF = "facebookresearch/classifier-balancing"
_COMMON = {"optimizer": "sgd", "momentum": 0.9, "schedule": "cosine", "warmup_epochs": 0,
           "sampler": "class_balanced"}
_CRT = {
    "imagenet": ({"epochs": 10, "lr": 0.2, "weight_decay": 5e-4, "batch_size": 512, **_COMMON},
                 f"{_REF} config/ImageNet_LT/cls_crt.yaml: re-initialised linear classifier, SGD lr 0.2 momentum 0.9 "
                 "wd 5e-4, batch 512, 10 epochs, cosine to 0, class-aware sampling (4 per class)"),
    "places": ({"epochs": 10, "lr": 0.1, "weight_decay": 5e-4, "batch_size": 256, **_COMMON},
               f"{_REF} config/Places_LT/cls_crt.yaml: SGD lr 0.1 momentum 0.9 wd 5e-4, batch 256, 10 epochs, "
               "cosine, class-aware sampling"),
    "inat": ({"epochs": 30, "lr": 0.2, "weight_decay": 1e-4, "batch_size": 512, **_COMMON},
             f"{_REF} config/iNaturalist18/cls_crt.yaml: SGD lr 0.2 momentum 0.9 wd 1e-4, batch 512, 30 epochs, "
             "cosine, class-aware sampling"),
}
_LWS = {
    "imagenet": ({"epochs": 5, "lr": 0.2, "weight_decay": 5e-4, "batch_size": 512, **_COMMON},
                 f"{_REF} config/ImageNet_LT/cls_lws.yaml: the stage-1 classifier frozen, per-class scales "
                 "(init 1) learnt with SGD lr 0.2 momentum 0.9 wd 5e-4, batch 512, 5 epochs, cosine, class-aware "
                 "sampling"),
    "places": ({"epochs": 5, "lr": 0.1, "weight_decay": 5e-4, "batch_size": 256, **_COMMON},
               f"{_REF} config/Places_LT/cls_lws.yaml: SGD lr 0.1 momentum 0.9 wd 5e-4, batch 256, 5 epochs, "
               "cosine, class-aware sampling"),
    "inat": ({"epochs": 5, "lr": 0.2, "weight_decay": 1e-4, "batch_size": 512, **_COMMON},
             f"{_REF} config/iNaturalist18/cls_lws.yaml: SGD lr 0.2 momentum 0.9 wd 1e-4, batch 512, 5 epochs, "
             "cosine, class-aware sampling"),
}
_NO_CIFAR = "no CIFAR-LT config in the reference; its ImageNet-LT one: "


def _recipes(table: dict[str, tuple[dict[str, Any], str]], extra: dict[str, Any] | None = None) -> dict[str, Recipe]:
    out = {family: Recipe({**settings, **(extra or {})}, source) for family, (settings, source) in table.items()}
    settings, source = table["imagenet"]
    for family in ("cifar10", "cifar100"):
        out[family] = Recipe({**settings, **(extra or {})}, _NO_CIFAR + source)
    return out


@register
class CRT(CEClassifier):
    """cRT: :mod:`ltstudy.methods.ce_classifier`'s classifier with Kang et al.'s recipe (re-initialised,
    class-balanced sampling)."""

    name = "crt"
    summary = "classifier re-training (cRT): a fresh linear classifier, class-balanced sampling, frozen features"
    Params = CEClassifierParams
    recipes = _recipes(_CRT, {"reinit": True})

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        if not isinstance(self.head, LinearHead):  # cRT's classifier is the reference's DotProduct (linear)
            self.head = LinearHead(feats.feature_dim, feats.num_classes).to(feats.train_x.device)


def tau_normalized(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """Each class vector divided by its L2 norm to the power τ (τ = 0: unchanged, τ = 1: unit norm)."""
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


@register
class TauNorm(PostHocMethod):
    name = "tau_norm"
    summary = "tau-normalisation: the classifier's weights divided by their norm^tau, tau chosen on val"
    Params = SelectParams
    heads = ("linear",)
    recipes = {family: Recipe({"epochs": 1, "warmup_epochs": 0, "schedule": "constant", "select": "validation",
                               "tau": 1.0, "tau_max": 2.0, "tau_step": 0.1},
                              f"{_REF} tau_norm.py: w / ||w||^tau for tau in np.linspace(0, 2, 21), logits without "
                              "the bias; ltstudy picks tau on the validation split")
               for family in ("cifar10", "cifar100", "imagenet")}

    def rule(self, tau: float) -> Any:
        weight = tau_normalized(self.feats.head.weight.detach(), tau)
        return lambda x: x @ weight.t()


class ScaledLogits(nn.Module):
    """LWS: a frozen classifier's logits times a learnt per-class scale."""

    def __init__(self, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.head = head.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * self.scales


class LWSParams(Params):
    """LWS learns only the per-class scales (with the trainer's lr, weight decay and sampler)."""


@register
class LWS(FeatureMethod):
    name = "lws"
    summary = "learnable weight scaling: per-class scales on a frozen classifier's logits, class-balanced"
    Params = LWSParams
    recipes = _recipes(_LWS)

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        if feats.head is None:
            raise ConfigError("lws scales a trained classifier, and the feature cache holds none (a pretrained "
                              "backbone's cache has no classifier of this dataset): use a trained backbone=CHECKPOINT")
        self.model = ScaledLogits(feats.head, feats.num_classes).to(feats.train_x.device)
        t = self.ctx.train
        self.weights = None
        if t.sampler != "instance":
            self.weights = sample_weights(feats.train_y, feats.class_counts, t.sampler,
                                          t.sampler_q).to(feats.train_x.device).float()

    def classifier(self) -> nn.Module:
        return self.model

    def batches(self, epoch: int) -> Any:
        f = self.feats
        return minibatches(len(f.train_y), self.ctx.train.batch_size, f.train_x.device, weights=self.weights)

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.model(self.feats.train_x[idx]), self.feats.train_y[idx])
