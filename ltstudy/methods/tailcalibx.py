"""TailCalib / TailCalibX — feature generation for long-tail classification.

Vigneswaran, Law, Balasubramanian, Tapaswi, "Feature Generation for Long-tail Classification",
ICVGIP 2021. Reference code: rahulvigneswaran/TailCalibX @ b836fd9 (``libs/core/TailCalib.py``,
``libs/core/TailCalibX.py``, ``generate_points``; identical in the ``tailcalib`` pip source).

Stage 2 of a decoupled pipeline: on frozen backbone features (L2-normalised), every class is topped up
to the largest class (+ ``extra_points``) with Gaussian samples drawn around its real samples, with a
mean and covariance "calibrated" from the ``topk`` nearest class statistics; a cosine classifier is then
trained on real + generated features (L2-normalised again). TailCalib (``regenerate=False``) generates
once; TailCalibX regenerates every epoch. Published CIFAR-100-LT IF100 values are the defaults
(λ = 1.0, K = 3, α = 0, SGD lr 0.01, momentum 0.7, wd 5e-4, batch 128, 150 epochs, no lr schedule).

Where ltstudy differs from the reference, and why:

* **Class statistics after the Tukey transform** (``stats_after_tukey=True``). The reference computes
  them on the untransformed features but calibrates transformed samples, mixing two spaces unless
  λ = 1; the paper's equations describe transformed statistics. ``stats_after_tukey=False`` restores
  the reference. With λ = 1 (the IF100 default) both coincide.
* **α on the diagonal.** The reference adds the scalar α to every entry of the covariance, which is not
  an isotropic inflation (and can break positive-definiteness); ltstudy adds α·I. The 1e-4·I jitter is
  kept.
* **Features.** The reference re-extracts train features with training augmentation every epoch. ltstudy
  regenerates from cached features: the eval-transform features by default, or — with
  ``augmented_views=V`` — cycles through V cached augmented passes (view ``epoch % V + 1``).
* **Epoch length.** TailCalibX trains ⌊N_original / batch⌋ steps per epoch from the large balanced
  set (the reference's ``epoch_steps``; ``steps_per_epoch="original"``); ``"balanced"`` makes an epoch a
  full pass over the balanced set. TailCalib always makes full passes, as in the reference.
* **Cosine classifier.** ltstudy's ``CosineHead`` normalises each class vector (a true cosine); the
  reference normalises each feature dimension across classes (``ltstudy.models.heads``). It is initialised
  from the backbone's head when that is a cosine head (the reference loads its stage-1 cosine head), else
  freshly.
* **Selection.** The reference keeps the best epoch on the test set; ltstudy reports every epoch on val
  and evaluates test once at the end.
* A class with a single sample has an undefined covariance; it counts as zero (then α·I + 1e-4·I).
* Remainder samples (G_c mod n_c) go to distinct randomly chosen real samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.methods.feature import FeatureMethod, FeatureSet, minibatches
from ltstudy.methods.registry import Params, Recipe, register
from ltstudy.models.heads import CosineHead

JITTER = 1e-4


def tukey(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Tukey's ladder of powers: x ** λ, or log(x + 1e-6) for λ = 0 (features are non-negative)."""
    if lam == 0:
        return torch.log(x.clamp_min(0) + 1e-6)
    return x.clamp_min(0).pow(lam)


def class_statistics(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class means (C, D) and unbiased covariances (C, D, D); a one-sample class has zero covariance."""
    d = x.shape[1]
    counts = torch.bincount(y, minlength=num_classes).to(x.dtype)
    means = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, y, x)
    means = means / counts.clamp_min(1)[:, None]
    centered = x - means[y]
    outer = centered[:, :, None] * centered[:, None, :]  # (N, D, D); chunk-free: features are small
    covs = torch.zeros(num_classes, d, d, dtype=x.dtype, device=x.device).index_add_(0, y, outer)
    return means, covs / (counts - 1).clamp_min(1)[:, None, None]


def spawn_counts(y: torch.Tensor, num_classes: int, extra_points: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Points each real sample spawns: ⌊G_c/n_c⌋ plus one for G_c mod n_c random samples of class c."""
    counts = torch.bincount(y, minlength=num_classes)
    goal = (counts.max() - counts + extra_points).clamp_min(0) * (counts > 0)
    base = goal // counts.clamp_min(1)
    rem = goal - base * counts
    # rank of each sample within its class under a random order
    key = torch.rand(len(y), generator=generator, device=y.device)
    order = torch.argsort(y.double() * 2 + key.double())  # class-major, random within class
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(len(y), device=y.device) - starts[y[order]]
    return base[y] + (rank < rem[y]).long()


def generate_features(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, tukey_lambda: float = 1.0,
                      alpha: float = 0.0, topk: int = 3, extra_points: int = 0,
                      stats_after_tukey: bool = True, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tukey-transformed real features plus calibrated Gaussian samples, and their labels.

    Vectorised: one distance matrix and top-k for all spawning samples; one Cholesky factor per
    distinct top-k set (the calibrated covariance depends only on the set), batched; the draws of a set
    are one matrix product. No loop over samples.
    """
    x = x.double()
    xt = tukey(x, tukey_lambda)
    means, covs = class_statistics(xt if stats_after_tukey else x, y, num_classes)
    k = min(topk, num_classes)
    per_sample = spawn_counts(y, num_classes, extra_points, generator)
    src = (per_sample > 0).nonzero().flatten()
    if len(src) == 0:
        return xt.float(), y
    d = x.shape[1]
    dist = torch.cdist(xt[src], means)  # (S, C) to every class mean, own class included
    present = torch.bincount(y, minlength=num_classes) > 0
    dist[:, ~present] = float("inf")
    nearest = torch.topk(dist, k, dim=1, largest=False).indices.sort(dim=1).values  # (S, K)
    mu = (means[nearest].sum(1) + xt[src]) / (k + 1)  # (S, D)
    sets, group = torch.unique(nearest, dim=0, return_inverse=True)  # (G, K), (S,)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    sigma = covs[sets].mean(1) + (alpha + JITTER) * eye  # (G, D, D)
    chol, info = torch.linalg.cholesky_ex(sigma)
    if bool((info > 0).any()):  # not positive-definite: add more jitter to the failing sets
        chol = torch.linalg.cholesky(sigma + 1e-3 * eye)
    reps = per_sample[src]
    point_src = torch.repeat_interleave(torch.arange(len(src), device=x.device), reps)
    z = torch.randn(len(point_src), d, dtype=x.dtype, device=x.device, generator=generator)
    point_group = group[point_src]
    out = torch.empty_like(z)
    order = torch.argsort(point_group)
    bounds = torch.bincount(point_group, minlength=len(sets)).cumsum(0).tolist()
    lo = 0
    for g, hi in enumerate(bounds):  # one product per distinct neighbour set, not per sample
        if hi > lo:
            rows = order[lo:hi]
            out[rows] = z[rows] @ chol[g].T
        lo = hi
    gen = mu[point_src] + out
    return torch.cat([xt, gen]).float(), torch.cat([y, y[src][point_src]])


class TailCalibXParams(Params):
    tukey: float = Field(1.0, ge=0.0, description="Tukey's ladder exponent λ (0 = log); CIFAR-100 IF100: 1.0")
    alpha: float = Field(0.0, ge=0.0, description="covariance inflation α, added to the diagonal")
    topk: int = Field(3, ge=1, description="number of nearest class statistics used for calibration")
    extra_points: int = Field(0, ge=0, description="points generated per class beyond the largest class")
    regenerate: bool = Field(True, description="TailCalibX: regenerate every epoch (False: one-shot TailCalib)")
    stats_after_tukey: bool = Field(True, description="class statistics on Tukey-transformed features "
                                                      "(False = the reference's pre-Tukey statistics)")
    scale_init: float = Field(10.0, gt=0.0, description="initial s of the cosine classifier (softplus(s))")
    steps_per_epoch: Literal["original", "balanced"] = Field(
        "original", description="TailCalibX epoch: N_original/batch steps (reference) or a full balanced pass")
    augmented_views: int = Field(0, ge=0, description="cached augmented train passes to cycle through "
                                                      "(0 = eval-transform features)")


_RECIPE = {"epochs": 150, "lr": 0.01, "momentum": 0.7, "weight_decay": 5e-4, "batch_size": 128,
           "optimizer": "sgd", "schedule": "constant", "warmup_epochs": 0, "tukey": 1.0, "alpha": 0.0, "topk": 3}
_SOURCE = ("tukey 1.0, alpha 0, topk 3; cosine classifier, SGD lr 0.01 momentum 0.7 wd 5e-4, batch 128, "
           "150 epochs, no lr schedule")


@register
class TailCalibX(FeatureMethod):
    name = "tailcalibx"
    summary = "TailCalib(X): calibrated Gaussian feature generation + cosine classifier on cached features"
    Params = TailCalibXParams
    head = "cosine"
    recipes = {
        "cifar10": Recipe(_RECIPE, "no CIFAR-10-LT command in rahulvigneswaran/TailCalibX; its CIFAR-100-LT IF 100 "
                                   "one: " + _SOURCE),
        "cifar100": Recipe(_RECIPE, "rahulvigneswaran/TailCalibX run_TailCalibX_CIFAR100-LT.sh, IF 100: " + _SOURCE
                           + "; IF 50: tukey 0.9, momentum 0, alpha 0.2; IF 10: tukey 0.9, momentum 0.9, topk 2",
                           by_imbalance={50.0: {"tukey": 0.9, "momentum": 0.0, "alpha": 0.2},
                                         10.0: {"tukey": 0.9, "momentum": 0.9, "topk": 2}}),
        "imagenet": Recipe(_RECIPE, "rahulvigneswaran/TailCalibX, mini-ImageNet-LT command: " + _SOURCE),
    }

    @classmethod
    def extract_options(cls, params: Any) -> dict[str, Any]:
        return {"fmaps": False, "augmented_views": int(params.augmented_views)}

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        """Val/test: Tukey with the same λ on L2-normalised features, then L2-normalise."""
        return F.normalize(tukey(F.normalize(x, dim=1), self.p.tukey), dim=1)

    def _generate(self, epoch: int) -> None:
        f, p = self.feats, self.p
        source = f.train_x
        if p.augmented_views and f.train_views:
            source = f.train_views[epoch % len(f.train_views)]
        gx, gy = generate_features(F.normalize(source, dim=1), f.train_y, f.num_classes,
                                   tukey_lambda=p.tukey, alpha=p.alpha, topk=p.topk,
                                   extra_points=p.extra_points, stats_after_tukey=p.stats_after_tukey)
        self.gen_x, self.gen_y = F.normalize(gx, dim=1), gy

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        head = CosineHead(feats.feature_dim, feats.num_classes, scale_init=self.p.scale_init)
        if feats.head_type == "cosine" and feats.head is not None:
            head.load_state_dict(feats.head.state_dict())
        self.head = head.to(feats.train_x.device)
        self.val_x, self.test_x = self._prep(feats.val_x), self._prep(feats.test_x)
        self._generate(0)

    def classifier(self) -> nn.Module:
        return self.head

    def on_epoch_start(self, epoch: int) -> None:
        if self.p.regenerate and epoch > 0:
            self._generate(epoch)

    def batches(self, epoch: int) -> Iterable[torch.Tensor]:
        bs = self.ctx.train.batch_size
        steps = None
        if self.p.regenerate and self.p.steps_per_epoch == "original":
            steps = max(len(self.feats.train_y) // bs, 1)
        return minibatches(len(self.gen_y), bs, self.gen_x.device, steps=steps)

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.gen_x[idx]), self.gen_y[idx])

    def logits(self, split: str) -> torch.Tensor:
        return self.head(self.val_x if split == "val" else self.test_x)
