"""FSA — Feature Space Augmentation for long-tailed data (Chu, Bian, Liu, Ling; ECCV 2020).

No official code exists; the closest reference is the unofficial SSRSGJYD/Feature-Space-Augmentation-
for-Long-Tailed-Data @ 941b484 (``phase_iii_online_train_or_test.py``, ``datasets/finetune_dataset.py``,
``utils/phase_ii_util.py``). Recipes are its configs (``ltstudy methods --dataset``): CIFAR ts 0.8, tg 0.2,
Na = Nf = 3, SGD momentum 0.9, lr 5e-4 constant, 40 epochs, batch 128; ImageNet-LT Na = 15, AdamW lr 1e-5.

Per step, for a batch of tail-class training samples: Grad-CAM of the tail map for its own label gives
the class-specific part ``A_t ⊙ 1[M_t > ts]``; Grad-CAM of one sample from each of its Nf confusing
classes (for that sample's own label) gives class-generic parts ``A_g ⊙ 1[M_g < tg]``; they are fused
with a random spatial mask (γ ~ U(0,1), R = 1[u > γ]) into Na new maps labelled with the tail class.
The classifier (avgpool → fc, initialised from the backbone's head) is fine-tuned with CE on the real
tail maps, the fused maps and 1 + Na random head-class maps per tail sample.

Where ltstudy differs from the reference, and why:

* **Own labels.** The reference labels every tail and fused map in a batch with the first item's label
  (``batch_tail_labels[0]``); here each fused map carries its own tail sample's label.
* **Confusing classes by row, head only.** The reference takes column t of the score matrix S (classes
  whose images are predicted *as* t) and does not restrict to head classes. Here row t is used — the
  classes that t's images are confused *with* (S[t, j], j ≠ t) — restricted to head classes, as the paper
  describes. S is the mean softmax of the backbone's classifier over each class's train features.
* **Grad-CAM in closed form.** For avgpool → linear, ∂z_c/∂A = w_c/(HW) everywhere, so Grad-CAM is
  ReLU(Σ_k w_ck A_k) min-max normalised (the 1/HW cancels) — batched, no autograd; the *current* fc is
  used, as in the reference's online variant. A constant map (e.g. a 1×1 map) gets an all-zero CAM
  instead of the reference's 0/0 = NaN.
* **Cached maps, eval transform.** Maps come from the feature cache (the backbone is frozen in the
  reference too), computed with the eval transform; the reference re-runs the backbone on augmented
  images each step. The confusion matrix is likewise computed on eval-transform train features.
* Head classes as the reference picks them, one rule per dataset (``head_rule``): CIFAR-10-LT the 7 most
  frequent classes (0-6; 272 tail images at IF 100), CIFAR-100-LT the most frequent classes while their
  share stays within 0.9, ImageNet-LT until it reaches 0.9; at least one class stays tail. Needs a
  backbone with a linear head.
* **Selection.** No best-on-test checkpoint: val every epoch, test once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.errors import ConfigError
from ltstudy.methods.feature import FeatureMethod, FeatureSet, minibatches
from ltstudy.methods.registry import Params, Recipe, register


def grad_cam(maps: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of ``labels`` for avgpool → linear(weight) on ``maps`` (B, C, H, W) → (B, H, W) in [0, 1]."""
    cam = torch.relu(torch.einsum("bchw,bc->bhw", maps, weight[labels]))
    flat = cam.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo).clamp_min(1e-12)
    return ((cam - lo[:, None, None]) / span[:, None, None]) * (hi > lo)[:, None, None]


def fuse(tail_maps: torch.Tensor, tail_cam: torch.Tensor, gen_maps: torch.Tensor, gen_cam: torch.Tensor,
         ts: float, tg: float, gamma: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``R ⊙ (A_t ⊙ 1[M_t > ts]) + (1 − R) ⊙ (A_g ⊙ 1[M_g < tg])`` with ``R = 1[u > γ]`` per location."""
    specific = tail_maps * (tail_cam > ts)[:, None].to(tail_maps.dtype)
    generic = gen_maps * (gen_cam < tg)[:, None].to(gen_maps.dtype)
    r = (u > gamma[:, None, None])[:, None].to(tail_maps.dtype)
    return r * specific + (1 - r) * generic


def head_classes(class_counts: torch.Tensor, ratio: float, rule: str = "reach", count: int = 7) -> torch.Tensor:
    """Boolean mask of the head classes, the most frequent ones (ties: lower class index first).

    The reference has one rule per dataset: ``"reach"`` (ImageNet-LT): the smallest prefix whose share of
    the training samples reaches ``ratio``; ``"within"`` (CIFAR-100-LT): the longest prefix whose share
    stays within ``ratio`` (at least one class); ``"count"`` (CIFAR-10-LT): the ``count`` most frequent
    classes (7). At least one class stays tail.
    """
    order = torch.argsort(class_counts, descending=True, stable=True)
    cum = torch.cumsum(class_counts[order].double(), 0) / class_counts.sum()
    if rule == "reach":
        n_head = int((cum < ratio - 1e-12).sum()) + 1
    elif rule == "within":
        n_head = int((cum <= ratio + 1e-12).sum())
    elif rule == "count":
        n_head = count
    else:
        raise ValueError(f"unknown head rule {rule!r}")
    n_head = min(max(n_head, 1), len(class_counts) - 1)
    mask = torch.zeros(len(class_counts), dtype=torch.bool, device=class_counts.device)
    mask[order[:n_head]] = True
    return mask


def confusing_classes(scores: torch.Tensor, head: torch.Tensor, k: int) -> torch.Tensor:
    """(C, k): for each class t the k head classes j ≠ t with the largest S[t, j] (row t)."""
    s = scores.clone()
    s.fill_diagonal_(float("-inf"))
    s[:, ~head] = float("-inf")
    k_eff = min(k, int(head.sum()))
    top = torch.topk(s, k_eff, dim=1).indices
    return top.repeat(1, -(-k // k_eff))[:, :k]  # fewer head classes than k: cycle through them


_CIFAR = {"epochs": 40, "optimizer": "sgd", "lr": 5e-4, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 128,
          "schedule": "constant", "warmup_epochs": 0, "ts": 0.8, "tg": 0.2, "num_fused": 3, "head_ratio": 0.9}
_CIFAR_SOURCE = "SGD lr 5e-4 momentum 0.9 (no weight decay), batch 128, 40 epochs, constant lr, Na = Nf = 3, ts 0.8, tg 0.2"


class FSAParams(Params):
    ts: float = Field(0.8, ge=0.0, le=1.0, description="CAM threshold of the class-specific (tail) part")
    tg: float = Field(0.2, ge=0.0, le=1.0, description="CAM threshold of the class-generic (confusing) part")
    num_fused: int = Field(3, ge=1, description="Na = Nf: fused maps per tail sample / confusing classes")
    head_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="cumulative share of samples in head classes "
                                                              "(head_rule reach / within)")
    head_rule: Literal["reach", "within", "count"] = Field(
        "reach", description="head classes: the most frequent until their share reaches head_ratio "
                             "(reference ImageNet-LT), while it stays within it (CIFAR-100-LT), or head_count "
                             "classes (CIFAR-10-LT)")
    head_count: int = Field(7, ge=1, description="number of head classes (head_rule count; reference CIFAR-10: 7)")


@register
class FSA(FeatureMethod):
    name = "fsa"
    summary = "FSA: Grad-CAM decomposition + fusion of tail/confusing-class feature maps, fc fine-tuning"
    Params = FSAParams
    recipes = {
        "cifar10": Recipe({**_CIFAR, "head_rule": "count", "head_count": 7},
                          "SSRSGJYD/Feature-Space-Augmentation-for-Long-Tailed-Data configs/phase_iii/"
                          "cifar10-LT_resnet32.yaml: " + _CIFAR_SOURCE + "; head classes 0-6 (datasets/cifar_lt.py)"),
        "cifar100": Recipe({**_CIFAR, "head_rule": "within", "head_ratio": 0.9},
                           "no CIFAR-100 config in the unofficial FSA code; its CIFAR-10 ResNet-32 one: "
                           + _CIFAR_SOURCE + "; head classes while their share stays within 0.9 "
                           "(datasets/cifar_lt.py Cifar100LTDataset)"),
        "imagenet": Recipe(
            {"epochs": 10, "optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.01, "adam_eps": 6e-7,
             "batch_size": 128, "schedule": "constant", "warmup_epochs": 0, "ts": 0.8, "tg": 0.2,
             "num_fused": 15, "head_rule": "reach", "head_ratio": 0.9},
            "SSRSGJYD/Feature-Space-Augmentation-for-Long-Tailed-Data configs/phase_iii/imageNet-LT.yaml: AdamW "
            "lr 1e-5 wd 0.01 eps 6e-7, batch 128, 10 epochs, constant lr, Na = Nf = 15, ts 0.8, tg 0.2; head "
            "classes until their share reaches 0.9 (datasets/imagenet_lt.py)"),
    }

    @classmethod
    def extract_options(cls, params: Any) -> dict[str, Any]:
        return {"fmaps": True, "augmented_views": 0}

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        if feats.train_maps is None:
            raise ConfigError("fsa needs the train feature maps in the cache (extract with --fmaps)")
        if feats.head is None or feats.head_type != "linear":
            raise ConfigError(f"fsa needs a backbone with a linear head (GAP + fc), got {feats.head_type!r}")
        dev = feats.train_x.device
        self.fc = nn.Linear(feats.feature_dim, feats.num_classes).to(dev)
        self.fc.load_state_dict(feats.head.state_dict())
        with torch.no_grad():
            probs = torch.softmax(feats.head(feats.train_x), 1)
        c = feats.num_classes
        sums = torch.zeros(c, c, device=dev).index_add_(0, feats.train_y, probs)
        self.scores = sums / feats.class_counts.clamp_min(1)[:, None].to(sums.dtype)
        self.is_head = head_classes(feats.class_counts, self.p.head_ratio, self.p.head_rule, self.p.head_count)
        self.confusing = confusing_classes(self.scores, self.is_head, self.p.num_fused)  # (C, Na)
        y = feats.train_y
        self.tail_idx = (~self.is_head[y]).nonzero().flatten()
        self.head_idx = self.is_head[y].nonzero().flatten()
        # per-class sample lists as (sorted order, class start, class count) for vectorised draws
        self.by_class = torch.argsort(y, stable=True)
        self.starts = torch.cumsum(feats.class_counts, 0) - feats.class_counts

    def classifier(self) -> nn.Module:
        return self.fc

    def _draw(self, classes: torch.Tensor) -> torch.Tensor:
        """One uniformly random training sample of each requested class."""
        n = self.feats.class_counts[classes]
        off = (torch.rand(classes.shape, device=classes.device) * n).long().clamp_max(n - 1)
        return self.by_class[self.starts[classes] + off]

    def batches(self, epoch: int) -> Iterable[torch.Tensor]:
        """Batches of tail-class train rows; each row brings 1 + 2·Na maps, so a batch stays ~batch_size."""
        items = max(self.ctx.train.batch_size // (2 + 2 * self.p.num_fused), 1)
        return minibatches(len(self.tail_idx), items, self.tail_idx.device)

    def batch_loss(self, b: torch.Tensor) -> torch.Tensor:
        maps, y, na = self.feats.train_maps, self.feats.train_y, self.p.num_fused
        tail = self.tail_idx[b]  # (B,)
        ty = y[tail]
        conf = self._draw(self.confusing[ty])  # (B, Na) one sample from each confusing class
        heads = self.head_idx[torch.randint(len(self.head_idx), (len(tail), 1 + na), device=maps.device)]
        with torch.no_grad():
            w = self.fc.weight
            tmap = maps[tail]
            tcam = grad_cam(tmap, w, ty)
            gmap = maps[conf.flatten()]
            gcam = grad_cam(gmap, w, y[conf.flatten()])
            nb = len(tail) * na
            gamma = torch.rand(nb, device=maps.device)
            u = torch.rand(nb, *tmap.shape[2:], device=maps.device)
            fused = fuse(tmap.repeat_interleave(na, 0), tcam.repeat_interleave(na, 0),
                         gmap, gcam, self.p.ts, self.p.tg, gamma, u)
        inputs = torch.cat([tmap, fused, maps[heads.flatten()]])
        labels = torch.cat([ty, ty.repeat_interleave(na), y[heads.flatten()]])
        return F.cross_entropy(self.fc(inputs.mean((2, 3))), labels)  # avgpool → fc
