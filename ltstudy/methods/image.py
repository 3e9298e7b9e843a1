"""The contract of image methods (``stage = "end_to_end"``): methods that train the network on images.

The trainer (:mod:`ltstudy.train.image`) builds the data, calls :meth:`ImageMethod.build_model`, then each
epoch calls ``on_epoch_start(epoch)`` and :meth:`ImageMethod.train_step` on every batch of
:meth:`ImageMethod.train_loader`; evaluation is ``model(x)``. A method overrides only what it changes:

===================== ======================================================= ==========================
hook                  default                                                 methods that override it
===================== ======================================================= ==========================
``loss(logits, y)``   none (required unless ``train_step`` is overridden)      ce, balanced_softmax,
                                                                              ldam_drw
``build_model()``     ``ltstudy.models.build_model`` with the class's ``head`` fsgl, metasaug
``on_epoch_start``    nothing                                                 ldam_drw, fsgl, metasaug
``train_loader(**kw)`` the standard augmented ``(x, y)`` loader                fsgl
``train_step(...)``   forward, ``loss``, :func:`ltstudy.runtime.optimizer_step` fsgl, metasaug
``carved_sets(p)``    no carved sets                                          metasaug
``state_dict()``      empty                                                   metasaug
``preprocess(pre)``   the model's own preprocessing (None for ResNets)        lift (test-time crops)
===================== ======================================================= ==========================

``carved_sets(params)`` declares data a method needs besides train / val / test (MetaSAug's balanced
meta set): ``{name: images per class}``; the data layer carves them from the training pool before any
loader is built, so no split is ever changed afterwards.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ltstudy.data import Preprocess
from ltstudy.methods.registry import Method, Params, Recipe
from ltstudy.models import build_model
from ltstudy.runtime import Amp, optimizer_step

#: The LDAM-DRW CIFAR recipe (kaidic/LDAM-DRW ``cifar_train.py``), the anchor of every CIFAR baseline row.
LDAM_CIFAR = {"model": "resnet32", "epochs": 200, "batch_size": 128, "optimizer": "sgd", "lr": 0.1,
              "momentum": 0.9, "weight_decay": 2e-4, "warmup_epochs": 5, "schedule": "step", "gamma": 0.01}
LDAM_CIFAR_SOURCE = ("LDAM-DRW CIFAR recipe (kaidic/LDAM-DRW cifar_train.py): ResNet-32, SGD lr 0.1 momentum "
                     "0.9 wd 2e-4, batch 128, 200 epochs, 5 warm-up epochs, lr x0.01 at epochs 160 and 180")
#: The Decoupling joint-training recipe on ImageNet-LT (Kang et al., ICLR 2020;
#: facebookresearch/classifier-balancing ``config/ImageNet_LT/feat_uniform.yaml``).
DECOUPLING_IMAGENET = {"model": "resnext50_32x4d", "epochs": 90, "batch_size": 512, "optimizer": "sgd",
                       "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0,
                       "schedule": "cosine"}
DECOUPLING_SOURCE = ("Decoupling joint training on ImageNet-LT (facebookresearch/classifier-balancing "
                     "config/ImageNet_LT/feat_uniform.yaml): ResNeXt-50, SGD lr 0.2 momentum 0.9 wd 5e-4, "
                     "batch 512, 90 epochs, cosine to 0")


#: Decoupling's joint training on iNaturalist 2018 (``config/iNaturalist18/feat_unifrom.yaml``)
DECOUPLING_INAT = {"model": "resnet50", "epochs": 90, "batch_size": 512, "optimizer": "sgd", "lr": 0.2,
                   "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 0, "schedule": "cosine"}
DECOUPLING_INAT_SOURCE = ("Decoupling joint training on iNaturalist 2018 (facebookresearch/classifier-balancing "
                          "config/iNaturalist18/feat_unifrom.yaml): ResNet-50, SGD lr 0.2 momentum 0.9 wd 1e-4, "
                          "batch 512, 90 epochs, cosine to 0")


def baseline_recipes(cifar: dict | None = None, imagenet: dict | None = None, note: str = "") -> dict[str, Recipe]:
    """The baselines' recipes: LDAM-DRW's on CIFAR, Decoupling's joint training on ImageNet-LT-like data (its
    iNaturalist 2018 config there; Places-LT, which the reference trains from an ImageNet-pretrained
    ResNet-152 without a config, falls back to the ImageNet-LT one)."""
    tail = f"; {note}" if note else ""
    return {
        "cifar10": Recipe({**LDAM_CIFAR, **(cifar or {})}, LDAM_CIFAR_SOURCE + tail),
        "cifar100": Recipe({**LDAM_CIFAR, **(cifar or {})}, LDAM_CIFAR_SOURCE + tail),
        "imagenet": Recipe({**DECOUPLING_IMAGENET, **(imagenet or {})}, DECOUPLING_SOURCE + tail),
        "inat": Recipe({**DECOUPLING_INAT, **(imagenet or {})}, DECOUPLING_INAT_SOURCE + tail),
    }


class ImageMethod(Method):
    """Base of the image methods; see the module docstring for the hooks and who uses them."""

    stage = "end_to_end"
    #: the classifier head of the default model (``ltstudy.models``: linear | normed | cosine)
    head: ClassVar[str] = "linear"

    @classmethod
    def carved_sets(cls, params: Params) -> dict[str, int]:
        """Extra per-class image sets this method needs, carved from the training pool by the data layer."""
        return {}

    def build_model(self) -> nn.Module:
        return build_model(self.ctx.model_name, self.ctx.num_classes, head=self.head, **self.ctx.model_options)

    def preprocess(self, pre: Preprocess | None) -> Preprocess | None:
        """The preprocessing of this method's batches: the model's own (``pre``; None for ltstudy's ResNets),
        which a method may change (LIFT's five test-time crops)."""
        return pre

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines neither loss() nor train_step()")

    def train_loader(self, **kw: Any) -> Any:
        """The training batches; ``kw`` are the trainer's ``make_loader`` arguments."""
        assert self.ctx.make_loader is not None
        return self.ctx.make_loader("train", **kw)

    def train_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                   amp: Amp) -> torch.Tensor:
        """One update on one batch of :meth:`train_loader`; returns the detached training loss."""
        x, y = batch
        with amp.autocast():
            loss = self.loss(model(x).float(), y)
        return optimizer_step(optimizer, loss, amp)
