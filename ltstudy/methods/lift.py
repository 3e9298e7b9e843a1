"""LIFT — parameter-efficient fine-tuning of a foundation model for long-tailed recognition.

Shi, Wei, Zhou, Shao, Han, Li, "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts", ICML
2024. Reference code: shijxcs/LIFT @ 661ead9 (``trainer.py``, ``models/peft_vit.py``, ``models/peft_modules.py``,
``models/classifiers.py``, ``utils/losses.py``, ``configs/model/clip_vit_b16.yaml``,
``scripts/run_tab1to4_main_results.sh``).

The image encoder of a CLIP (or ImageNet-21k ViT) stays frozen; small modules are trained with a cosine
classifier for 10 epochs:

* **AdaptFormer** in every block (``adaptformer``, LIFT's method): a bottleneck beside the MLP with a zero
  up-projection and a learnable scale, of width ``adapter_dim`` (unset: LIFT's rule
  2^max(0, ⌊log2(C / 2L)⌋) for C classes and L blocks: 4 on CIFAR-100, 32 on ImageNet-LT with ViT-B/16).
  ``lora``, ``vpt`` (shallow / deep, ``vpt_len`` tokens) and ``bias_tuning`` are LIFT's other options and can
  be combined (``ltstudy.models.adapters``).
* **Cosine classifier** ``scale · cos(x, w_c)`` (``scale`` 25, LIFT's config), initialised from the class names'
  text features (``init_head=text_feat``, CLIP): the prompt template(s) (``prompt``: ``default`` "a photo of a
  {}.", ``classname`` "{}", ``ensemble`` CLIP's 80 ImageNet templates averaged) encoded by the text tower,
  L2-normalised, mapped into the image feature space through the visual projection's transpose and
  normalised again. ``class_mean`` (the ViT default) initialises from the normalised class means of the
  frozen encoder's training features; ``none`` keeps the random unit rows.
* **Logit-adjusted loss**: cross-entropy on ``logits + τ·log π`` (``tau`` 1; ltstudy computes
  ``log(π^τ + 1e-12)``, Menon et al.'s form, identical for τ = 1).
* **Test-time ensemble** (``tte``): the image resized to 224 + ``expand`` (24), its five 224 crops, logits
  averaged; without it the shorter side is resized to 256 (``crop_pct`` 0.875) and centre-cropped.

Recipe (``clip_vit_b16.yaml``): SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, 10 epochs (20 on
iNaturalist 2018), cosine lr over the epochs without warm-up, random resized crop + flip at 224 (CIFAR
too: its 32-pixel images are cropped and resized on the device), AMP.

Where ltstudy differs from the reference, and why:

* **Adapters from libraries.** The reference rewrites the ViT forward pass by hand. ltstudy keeps timm's /
  open_clip's own forward and inserts the modules into their blocks; LoRA is peft's, which adapts the
  fused q/k/v projection (timm) or the attention's input and output projections (open_clip's
  ``nn.MultiheadAttention``) where the reference adapts q and v only; its scaling 1/r is the reference's.
* **Validation.** The reference trains on the whole training set and reports the test set (best-epoch
  selection is not used either). ltstudy evaluates the balanced validation split every epoch (with the
  test-time ensemble when ``tte`` is on, so val and test are evaluated alike) and the test split once.
* **CIFAR augmentation** is the reference's (random resized crop at 224, flip), computed on the device on
  whole batches (``ltstudy.data.preprocess``) instead of per PIL image.
* **Features before the projection.** As in the reference, the classifier sees the pooled, normed class
  token before CLIP's projection (width 768 for ViT-B/16); open_clip towers without a separable projection
  give the joint embedding, where the text features need no mapping.
* **Checkpoints** hold the whole network (the frozen weights too), like every ltstudy checkpoint; the
  reference saves the tuner and head only.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.data import LIST_DATASETS, Preprocess
from ltstudy.errors import ConfigError, DataError
from ltstudy.methods.image import ImageMethod
from ltstudy.methods.logit_adjust import logit_adjusted_loss
from ltstudy.methods.registry import Params, Recipe, register
from ltstudy.models import Classifier, ScaledCosineHead, build_backbone, is_pretrained_name
from ltstudy.models.adapters import add_adaptformer, add_lora, add_vpt, block_biases, freeze_backbone
from ltstudy.models.weights import parse_model_name, require

#: LIFT's default prompt and CLIP's single-name prompt; ``ensemble`` uses open_clip's OPENAI_IMAGENET_TEMPLATES
TEMPLATES = {"default": "a photo of a {}.", "classname": "{}"}


def lift_adapter_dim(num_classes: int, layers: int) -> int:
    """LIFT's bottleneck width: 2^max(0, floor(log2(C / (2 L))))."""
    return 2 ** max(0, int(math.log2(num_classes / (layers * 2))))


def prompts_for(class_names: list[str], prompt: str) -> list[list[str]]:
    """The prompts of every template (outer) for every class (inner)."""
    if prompt == "ensemble":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [[t(c) for c in class_names] for t in OPENAI_IMAGENET_TEMPLATES]
    return [[TEMPLATES[prompt].format(c) for c in class_names]]


def text_head_weight(backbone: nn.Module, class_names: list[str], prompt: str) -> torch.Tensor:
    """LIFT's text initialisation: per template the normalised text features, averaged over templates, mapped
    into the image feature space (through the projection's transpose) and normalised."""
    groups = prompts_for(class_names, prompt)
    flat = backbone.encode_text([p for group in groups for p in group])  # one pass over every prompt
    mean = flat.view(len(groups), len(class_names), -1).mean(0)
    return F.normalize(backbone.text_to_feature(mean), dim=-1)


class LIFTParams(Params):
    adaptformer: bool = Field(True, description="AdaptFormer beside every block's MLP (LIFT)")
    lora: bool = Field(False, description="LoRA on the attention projections (peft)")
    vpt: Literal["none", "shallow", "deep"] = Field("none", description="visual prompt tuning")
    bias_tuning: bool = Field(False, description="train the blocks' biases (BitFit)")
    adapter_dim: int | None = Field(None, ge=1, description="bottleneck of AdaptFormer / rank of LoRA (unset: "
                                                            "LIFT's 2^max(0, floor(log2(C/2L))))")
    adaptformer_scale: float | None = Field(None, description="AdaptFormer's output scale (unset: learnable, 1 at "
                                                              "start)")
    vpt_len: int = Field(10, ge=1, description="visual prompt tokens")
    scale: float = Field(25.0, gt=0.0, description="cosine classifier scale")
    tau: float = Field(1.0, ge=0.0, description="logit-adjusted loss: power of the prior (1 = published)")
    init_head: Literal["auto", "text_feat", "class_mean", "none"] = Field(
        "auto", description="classifier initialisation (auto: text_feat for open_clip, class_mean for timm)")
    prompt: Literal["default", "classname", "ensemble"] = Field(
        "default", description="text initialisation: 'a photo of a {}.', '{}', or CLIP's 80 ImageNet templates")
    tte: bool = Field(True, description="test-time ensemble: five crops of the image resized to side + expand")
    expand: int = Field(24, ge=0, description="pixels added to the side before the five crops")


_RECIPE = {"model": "open_clip:ViT-B-16/openai", "epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.01,
           "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0, "sampler": "instance",
           "crop_pct": 0.875, "adaptformer": True, "scale": 25.0, "tau": 1.0, "tte": True, "expand": 24}
_CIFAR = {**_RECIPE, "crop_padding": 0, "random_resized_crop": True}
_SOURCE = ("shijxcs/LIFT configs/model/clip_vit_b16.yaml + scripts/run_tab1to4_main_results.sh (adaptformer True, "
           "tte True): CLIP ViT-B/16, AdaptFormer, cosine classifier (scale 25) from text features, LA loss, SGD lr "
           "0.01 momentum 0.9 wd 5e-4, batch 128, {epochs} epochs, cosine lr, five-crop test-time ensemble "
           "(expand 24)")


@register
class LIFT(ImageMethod):
    name = "lift"
    summary = "LIFT: AdaptFormer (LoRA / VPT / bias) on a frozen CLIP or ViT, text-initialised cosine head, LA loss"
    Params = LIFTParams
    recipes = {
        "cifar10": Recipe(_CIFAR, "no CIFAR-10-LT run in the reference; its CIFAR-100-LT one: "
                          + _SOURCE.format(epochs=10) + "; random resized crop + flip at 224"),
        "cifar100": Recipe(_CIFAR, _SOURCE.format(epochs=10) + "; CIFAR: random resized crop + flip at 224"),
        "imagenet": Recipe(_RECIPE, _SOURCE.format(epochs=10)),
        "places": Recipe(_RECIPE, _SOURCE.format(epochs=10)),
        "inat": Recipe({**_RECIPE, "epochs": 20}, _SOURCE.format(epochs=20) + " (num_epochs 20)"),
    }

    @staticmethod
    def _init(train: Any, params: LIFTParams) -> str:
        library = parse_model_name(train.model).library
        if params.init_head != "auto":
            return params.init_head
        return "text_feat" if library == "open_clip" else "class_mean"

    @classmethod
    def check(cls, train: Any, params: LIFTParams) -> None:
        if not is_pretrained_name(train.model):
            raise ConfigError(f"lift fine-tunes a pretrained vision transformer: model=open_clip:ARCH/TAG or "
                              f"timm:NAME, got {train.model!r}")
        init = cls._init(train, params)
        if init == "text_feat" and parse_model_name(train.model).library != "open_clip":
            raise ConfigError(f"init_head=text_feat needs a CLIP text tower (an open_clip model); {train.model} has "
                              "none: use init_head=class_mean")
        if init == "text_feat" and train.dataset in LIST_DATASETS and not train.class_names:
            raise ConfigError("lift initialises its classifier from the class names' text features: give the file "
                              "list's class names, class_names=FILE (one per line, in label order), or use "
                              "init_head=class_mean")
        if train.class_names and not Path(train.class_names).is_file():
            raise DataError(f"class-names file {train.class_names} not found")
        if params.lora:
            require("peft")  # a missing library is one line here, not a failure in every trial

    def preprocess(self, pre: Preprocess | None) -> Preprocess | None:
        if pre is None or not self.p.tte:
            return pre
        return replace(pre, eval_crops=5, expand=self.p.expand)

    @torch.no_grad()
    def _class_means(self, backbone: nn.Module) -> torch.Tensor:
        """Normalised class means of the frozen encoder's training features (eval transform, no adapters)."""
        loader = self.ctx.make_loader("train", batch_size=self.ctx.train.eval_batch_size, train=False,
                                      preprocess=backbone.preprocess, num_workers=self.ctx.train.num_workers)
        sums = torch.zeros(self.ctx.num_classes, backbone.feature_dim, device=self.ctx.device, dtype=torch.float64)
        backbone.eval()
        for x, y in loader:
            sums.index_add_(0, y, backbone(x).double())
        counts = self.ctx.class_counts.double().clamp_min(1)[:, None]
        return F.normalize((sums / counts).float(), dim=-1)

    def build_model(self) -> nn.Module:
        p, t, ctx = self.p, self.ctx.train, self.ctx
        backbone = build_backbone(t.model, **ctx.model_options).to(ctx.device)
        freeze_backbone(backbone)
        init = self._init(t, p)
        head = ScaledCosineHead(backbone.feature_dim, ctx.num_classes, p.scale).to(ctx.device)
        if init == "text_feat":
            head.set_weight(text_head_weight(backbone, list(ctx.data.class_names), p.prompt))
        elif init == "class_mean":
            head.set_weight(self._class_means(backbone))
        backbone.drop_text()
        adaptformer, lora, vpt, bias = p.adaptformer, p.lora, p.vpt, p.bias_tuning
        if adaptformer or lora or vpt != "none" or bias:
            layers = len(backbone.transformer_blocks())
            if lora or adaptformer:
                dim = p.adapter_dim or lift_adapter_dim(ctx.num_classes, layers)
            if lora:  # first: peft freezes every parameter that is not LoRA's
                add_lora(backbone, dim, alpha=1.0)
            if adaptformer:
                add_adaptformer(backbone, dim, p.adaptformer_scale)
            if vpt != "none":
                backbone.add_module("prompts", add_vpt(backbone, p.vpt_len, deep=vpt == "deep"))
            if bias:
                for b in block_biases(backbone):
                    b.requires_grad_(True)
            backbone.to(ctx.device)
        return Classifier(backbone, head)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, y, self.ctx.class_counts, self.p.tau)
