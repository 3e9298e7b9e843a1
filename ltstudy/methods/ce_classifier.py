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

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.data.samplers import sample_weights
from ltstudy.methods.base import MethodContext, Params, register
from ltstudy.methods.feature_base import FeatureMethod, FeatureSet, minibatches
from ltstudy.models import build_head


class CEClassifierParams(Params):
    reinit: bool = Field(True, description="re-initialise the head (cRT); False fine-tunes the backbone's")


@register
class CEClassifier(FeatureMethod):
    name = "ce_classifier"
    summary = "cross-entropy classifier retrained on cached backbone features (cRT-style)"
    Params = CEClassifierParams
    train_defaults = {"epochs": 10, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 512,
                      "schedule": "cosine", "warmup_epochs": 0}

    def __init__(self, params: CEClassifierParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        self.reinit = params.reinit

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        head = build_head(feats.head_type, feats.feature_dim, feats.num_classes)
        if not self.reinit and feats.head is not None:
            head.load_state_dict(feats.head.state_dict())
        self.head = head.to(feats.train_x.device)
        t = self.ctx.train
        sampler = getattr(t, "sampler", "instance")
        self.weights = None
        if sampler != "instance":
            self.weights = sample_weights(feats.train_y, feats.class_counts, sampler,
                                          getattr(t, "sampler_q", 0.5)).to(feats.train_x.device).float()

    def classifier(self) -> nn.Module:
        return self.head

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        f = self.feats
        total, steps = torch.zeros((), device=f.train_x.device), 0
        for idx in minibatches(len(f.train_y), self.ctx.train.batch_size, f.train_x.device,
                               weights=self.weights):
            total += self.step(optimizer, self.loss(self.head(f.train_x[idx]), f.train_y[idx]))
            steps += 1
        return total / max(steps, 1)

    def state_dict(self) -> dict[str, Any]:
        return {}
