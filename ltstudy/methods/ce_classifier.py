"""``ce_classifier``: the comparison row for the feature-stage methods — a classifier retrained with
cross-entropy on the same cached features (cRT-style, Kang et al., ICLR 2020, "Decoupling
Representation and Classifier").

A fresh head of the backbone's head type is trained on the frozen features; the trainer's ``sampler``
setting chooses the re-sampling (``instance`` — the default here, i.e. "CE on the cached features" —
or ``class_balanced``, which is cRT proper; ``sqrt`` / ``power`` as in the image trainer). Recipe from
cRT's ImageNet-LT setting: 10 epochs, SGD lr 0.2, momentum 0.9, wd 5e-4, batch 512, cosine schedule.

Why a method and not a TailCalibX setting: it shares no step with TailCalibX (no Tukey transform, no
generation, no L2 normalisation), so as a flag it would switch off everything TailCalibX does; as its
own method it is one short module and the same row for DLSA and FSA too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.data.samplers import sample_weights
from ltstudy.methods.feature import FeatureMethod, FeatureSet, minibatches
from ltstudy.methods.registry import Params, Recipe, register
from ltstudy.models import build_head


class CEClassifierParams(Params):
    reinit: bool = Field(True, description="re-initialise the head (cRT); False fine-tunes the backbone's")


_RECIPE = {"epochs": 10, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 512,
           "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 0, "sampler": "instance", "reinit": True}
_SOURCE = ("cRT on ImageNet-LT (facebookresearch/classifier-balancing config/ImageNet_LT/cls_crt.yaml): a "
           "re-initialised classifier, SGD lr 0.2 momentum 0.9 wd 5e-4, batch 512, 10 epochs, cosine; ltstudy "
           "keeps instance sampling as the plain-CE reference row (cRT proper: sampler=class_balanced; the "
           "reference draws 4 images per class)")


@register
class CEClassifier(FeatureMethod):
    name = "ce_classifier"
    summary = "cross-entropy classifier retrained on cached backbone features (cRT-style)"
    Params = CEClassifierParams
    recipes = {family: Recipe(_RECIPE, _SOURCE) for family in ("cifar10", "cifar100", "imagenet")}

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        head = build_head(feats.head_type, feats.feature_dim, feats.num_classes)
        if not self.p.reinit and feats.head is not None:
            head.load_state_dict(feats.head.state_dict())
        self.head = head.to(feats.train_x.device)
        t = self.ctx.train
        self.weights = None
        if t.sampler != "instance":
            self.weights = sample_weights(feats.train_y, feats.class_counts, t.sampler,
                                          t.sampler_q).to(feats.train_x.device).float()

    def classifier(self) -> nn.Module:
        return self.head

    def batches(self, epoch: int) -> Iterable[torch.Tensor]:
        f = self.feats
        return minibatches(len(f.train_y), self.ctx.train.batch_size, f.train_x.device, weights=self.weights)

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.feats.train_x[idx]), self.feats.train_y[idx])
