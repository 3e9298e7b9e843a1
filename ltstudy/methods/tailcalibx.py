"""TailCalib / TailCalibX — feature generation for long-tail classification.

Vigneswaran, Law, Balasubramanian, Tapaswi, "Feature Generation for Long-tail Classification",
ICVGIP 2021. Reference code: rahulvigneswaran/TailCalibX @ b836fd9 (``libs/core/TailCalib.py``,
``libs/core/TailCalibX.py``, ``generate_points``; identical in the ``tailcalib`` pip source).

Stage 2 of a decoupled pipeline: on frozen backbone features (L2-normalised), every class is topped up
to the largest class (+ ``extra_points``) with Gaussian samples drawn around its real samples, with a
mean and covariance "calibrated" from the ``topk`` nearest class statistics; a cosine classifier is then
trained on real + generated features (L2-normalised again). TailCalib (``regenerate=False``) generates
once; TailCalibX regenerates every epoch. The recipes are the reference's commands
(``ltstudy methods -m tailcalibx``): CIFAR-100-LT IF 100 λ = 1.0, K = 3, α = 0, SGD lr 0.01, momentum 0.7,
wd 5e-4, batch 128, 150 epochs, no lr schedule; IF 50 and IF 10 have their own λ, α, momentum and K.

How it scales to ImageNet-LT (N = 115,846, C = 1,000, D = 2,048), where the reference's per-sample
Cholesky factors (and ltstudy's former (N, D, D) outer products: 3.6 TiB) are out of reach:

* The calibrated covariance of a sample is Σ' = (1/K) Σ_{k ∈ topK} Σ_k + α-term + 1e-4·I, with Σ_k the
  unbiased covariance of class k, X_kᵀX_k/(n_k - 1) for the centred class rows X_k. A draw from
  N(0, Σ_k) is X_kᵀξ/√(n_k - 1) with ξ ~ N(0, I_{n_k}), so a draw from N(μ', Σ') is μ' plus
  Σ_k X_kᵀξ_k/√(K(n_k - 1)) plus independent α and jitter noise: exactly the reference's distribution,
  without any D x D matrix. The statistics (class means, the class-sorted rows, every sample's K nearest
  classes) are computed once per feature source and kept across epochs: one class-sorted N x D copy of
  the transformed features plus O(C·D) (below the O(C·D²) of per-class covariances), each generated point
  costing Σ_k n_k·D.
* TailCalibX trains ⌊N / batch⌋ steps per epoch (the reference's ``epoch_steps``) on a shuffle of the
  regenerated balanced set, so only the points those steps draw are generated (about N per epoch, not
  the C·n_max of the whole set); ``steps_per_epoch="balanced"`` passes over the whole set, generated a
  chunk of batches at a time. One-shot TailCalib keeps its generated set, as the reference does.

Where ltstudy differs from the reference, and why:

* **Class statistics after the Tukey transform** (``stats_after_tukey=True``). The reference computes
  them on the untransformed features but calibrates transformed samples, mixing two spaces unless
  λ = 1; the paper's equations describe transformed statistics. ``stats_after_tukey=False`` restores
  the reference. With λ = 1 (the IF100 default) both coincide.
* **α's form is selectable.** The reference adds the scalar α to every entry of the covariance
  (``alpha_form="all"``, the recipes' setting): that adds variance α·D along the all-ones direction only
  (α·11ᵀ is positive semi-definite for α ≥ 0, so positive-definiteness is never at stake). On unit-norm
  features, whose total variance is at most 1, α = 0.2 in 128 dimensions already adds 25.6, so most of
  the searched [0, 0.5] is noise. ``alpha_form="diagonal"`` adds α·I instead (isotropic), and
  ``alpha_units="trace"`` divides α by D, so α is the total variance added in either form, comparable to
  the features' own (≤ 1): the search space uses that scale. ``alpha_units="absolute"`` is the reference's.
* **Features.** The reference re-extracts train features with training augmentation every epoch. ltstudy
  regenerates from cached features: the eval-transform features by default, or — with
  ``augmented_views=V`` — cycles through V cached augmented passes (view ``epoch % V + 1``).
* **Cosine classifier.** ltstudy's ``CosineHead`` normalises each class vector (a true cosine); the
  reference normalises each feature dimension across classes (``ltstudy.models.heads``). It is initialised
  from the backbone's head when that is a cosine head (the reference loads its stage-1 cosine head), else
  freshly.
* **Selection.** The reference keeps the best epoch on the test set; ltstudy reports every epoch on val
  and evaluates test once at the end.
* A class with a single sample has an undefined covariance; it counts as zero (then the α-term + 1e-4·I).
* Remainder samples (G_c mod n_c) go to distinct randomly chosen real samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.methods.feature import FeatureMethod, FeatureSet
from ltstudy.methods.registry import Params, Recipe, register
from ltstudy.models.heads import CosineHead

JITTER = 1e-4
#: rows handled at once when computing distances to the class means and when generating a balanced pass
CHUNK = 8192


def tukey(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Tukey's ladder of powers: x ** λ, or log(x + 1e-6) for λ = 0 (features are non-negative)."""
    if lam == 0:
        return torch.log(x.clamp_min(0) + 1e-6)
    return x.clamp_min(0).pow(lam)


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


def tukey_(x: torch.Tensor, lam: float) -> torch.Tensor:
    """:func:`tukey` in place (no second N x D copy at ImageNet scale)."""
    x.clamp_(min=0)
    if lam == 0:
        return x.add_(1e-6).log_()
    return x if lam == 1 else x.pow_(lam)


@dataclass
class Calibration:
    """What generation needs from one feature source, computed once and reused every epoch.

    ``rows`` are the statistics' features (Tukey-transformed, or the untransformed ones for the reference's
    pre-Tukey statistics) sorted by class, ``starts`` / ``counts`` their class blocks, ``pos`` each real
    sample's row in them, ``means`` the class means and ``nearest`` every real sample's K nearest class
    means (its own class included). The Tukey-transformed real features (the points generation starts from)
    are ``rows[pos]``, or ``xt_own`` when the statistics are pre-Tukey: one N x D copy in the default case.
    """

    rows: torch.Tensor  # (N, D)
    pos: torch.Tensor  # (N,)
    y: torch.Tensor  # (N,)
    starts: torch.Tensor  # (C,)
    counts: torch.Tensor  # (C,)
    means: torch.Tensor  # (C, D)
    nearest: torch.Tensor  # (N, K)
    xt_own: torch.Tensor | None = None  # (N, D), pre-Tukey statistics only

    @classmethod
    def build(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, tukey_lambda: float, topk: int,
              stats_after_tukey: bool = True) -> Calibration:
        """From L2-normalised features ``x``, which it may overwrite; memory O(N·D + C·D), sums and distances
        a chunk of rows at a time."""
        counts = torch.bincount(y, minlength=num_classes)
        order = torch.argsort(y, stable=True)
        pos = torch.empty_like(order)
        pos[order] = torch.arange(len(y), device=y.device)
        xt_own = None
        if stats_after_tukey:
            rows = tukey_(x, tukey_lambda)[order]
        else:
            rows, xt_own = x[order], tukey(x, tukey_lambda)
        del x
        starts = torch.cumsum(counts, 0) - counts
        y_sorted = y[order]
        sums = torch.zeros(num_classes, rows.shape[1], dtype=torch.float64, device=rows.device)
        for lo in range(0, len(y), CHUNK):
            sums.index_add_(0, y_sorted[lo:lo + CHUNK], rows[lo:lo + CHUNK].double())
        means = (sums / counts.clamp_min(1)[:, None]).to(rows.dtype)
        cal = cls(rows, pos, y, starts, counts, means, torch.empty(0, dtype=torch.long), xt_own)
        k = min(topk, int((counts > 0).sum()))
        nearest = torch.empty(len(y), k, dtype=torch.long, device=rows.device)
        absent = counts == 0
        for lo in range(0, len(y), CHUNK):
            dist = torch.cdist(cal.real(torch.arange(lo, min(lo + CHUNK, len(y)), device=rows.device)), means)
            dist[:, absent] = float("inf")
            nearest[lo:lo + CHUNK] = torch.topk(dist, k, dim=1, largest=False).indices
        cal.nearest = nearest
        return cal

    def real(self, idx: torch.Tensor) -> torch.Tensor:
        """The Tukey-transformed features of real samples ``idx``."""
        return self.xt_own[idx] if self.xt_own is not None else self.rows[self.pos[idx]]

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def draw(self, src: torch.Tensor, alpha: float = 0.0, alpha_form: str = "all",
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One calibrated Gaussian point per entry of ``src`` (indices of real samples), (P, D).

        μ' = (Σ_{k ∈ topK} μ_k + x)/(K + 1); the noise has covariance (1/K) Σ_k Σ_k + the α-term
        (α·11ᵀ for ``"all"``, α·I for ``"diagonal"``; α as given, see ``TailCalibXParams.alpha_units``)
        + 1e-4·I, drawn through the class rows (module docstring): one (P_c x n_c) @ (n_c x D) product
        per class c among the points' nearest classes.
        """
        dev, dtype = self.rows.device, self.rows.dtype
        nearest = self.nearest[src]  # (P, K)
        p, k = nearest.shape
        d = self.dim
        mu = (self.means[nearest].sum(1) + self.real(src)) / (k + 1)
        noise = torch.zeros(p, d, dtype=dtype, device=dev)
        pair_cls = nearest.flatten()
        pair_pt = torch.arange(p, device=dev).repeat_interleave(k)
        order = torch.argsort(pair_cls, stable=True)
        classes, per = torch.unique_consecutive(pair_cls[order], return_counts=True)
        lo = 0
        for c, m in zip(classes.tolist(), per.tolist(), strict=True):
            pts = pair_pt[order[lo:lo + m]]
            lo += m
            n = int(self.counts[c])
            if n < 2:  # a one-sample class: zero covariance
                continue
            start = int(self.starts[c])
            block = self.rows[start:start + n]
            xi = torch.randn(m, n, dtype=dtype, device=dev, generator=generator)
            centred = xi @ block - xi.sum(1, keepdim=True) * self.means[c]
            noise[pts] += centred / math.sqrt(n - 1)  # a point's K nearest classes are distinct: no repeats
        noise /= math.sqrt(k)
        if alpha > 0:
            width = 1 if alpha_form == "all" else d  # α·11ᵀ: one shared draw along the all-ones direction
            noise += math.sqrt(alpha) * torch.randn(p, width, dtype=dtype, device=dev, generator=generator)
        noise += math.sqrt(JITTER) * torch.randn(p, d, dtype=dtype, device=dev, generator=generator)
        return mu + noise


def generate_features(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, tukey_lambda: float = 1.0,
                      alpha: float = 0.0, topk: int = 3, extra_points: int = 0, alpha_form: str = "all",
                      stats_after_tukey: bool = True, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tukey-transformed real features plus every calibrated Gaussian point of one generation, and labels.

    The whole balanced set at once, as the reference's ``generate_points`` returns it (one-shot TailCalib
    and the tests); TailCalibX draws only the points an epoch uses (:class:`TailCalibX`).
    """
    cal = Calibration.build(x.clone(), y, num_classes, tukey_lambda, topk, stats_after_tukey)
    xt = cal.real(torch.arange(len(y), device=y.device))
    per_sample = spawn_counts(y, num_classes, extra_points, generator)
    src = torch.repeat_interleave(torch.arange(len(y), device=y.device), per_sample)
    if len(src) == 0:
        return xt, y
    return torch.cat([xt, cal.draw(src, alpha, alpha_form, generator)]), torch.cat([y, y[src]])


class TailCalibXParams(Params):
    tukey: float = Field(1.0, ge=0.0, description="Tukey's ladder exponent λ (0 = log); CIFAR-100 IF100: 1.0")
    alpha: float = Field(0.0, ge=0.0, description="covariance inflation α (see alpha_form, alpha_units)")
    alpha_form: Literal["all", "diagonal"] = Field(
        "all", description="α added to every covariance entry (reference) or to the diagonal")
    alpha_units: Literal["absolute", "trace"] = Field(
        "absolute", description="α as given (reference) or the total variance added (α/D per entry): "
                                "comparable to the total variance of unit-norm features, at most 1")
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
           "optimizer": "sgd", "schedule": "constant", "warmup_epochs": 0, "tukey": 1.0, "alpha": 0.0, "topk": 3,
           "alpha_form": "all", "alpha_units": "absolute"}
_SOURCE = ("tukey 1.0, alpha 0 (added to every covariance entry), topk 3; cosine classifier, SGD lr 0.01 "
           "momentum 0.7 wd 5e-4, batch 128, 150 epochs, no lr schedule")


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

    @property
    def alpha(self) -> float:
        """α in absolute units (per covariance entry)."""
        return self.p.alpha / self.feats.feature_dim if self.p.alpha_units == "trace" else self.p.alpha

    def _calibration(self, epoch: int) -> Calibration:
        """The statistics of this epoch's feature source, built once per source and kept."""
        f = self.feats
        view = epoch % len(f.train_views) + 1 if self.p.augmented_views and f.train_views else 0
        if view not in self._calibrations:
            self._calibrations.clear()  # one source at a time: O(N·D) memory
            source = f.train_x if view == 0 else f.train_views[view - 1]
            self._calibrations[view] = Calibration.build(F.normalize(source, dim=1), f.train_y, f.num_classes,
                                                         self.p.tukey, self.p.topk, self.p.stats_after_tukey)
        return self._calibrations[view]

    def _points(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of rows of this epoch's balanced set: real rows first, then generated ones."""
        cal, n = self.cal, len(self.feats.train_y)
        real = rows < n
        x = torch.empty(len(rows), cal.dim, dtype=cal.rows.dtype, device=cal.rows.device)
        x[real] = cal.real(rows[real])
        y = torch.empty(len(rows), dtype=cal.y.dtype, device=cal.y.device)
        y[real] = cal.y[rows[real]]
        src = self.point_src[rows[~real] - n]
        if len(src):
            x[~real] = cal.draw(src, self.alpha, self.p.alpha_form)
            y[~real] = cal.y[src]
        return F.normalize(x, dim=1), y

    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        head = CosineHead(feats.feature_dim, feats.num_classes, scale_init=self.p.scale_init)
        if feats.head_type == "cosine" and feats.head is not None:
            head.load_state_dict(feats.head.state_dict())
        self.head = head.to(feats.train_x.device)
        self.val_x, self.test_x = self._prep(feats.val_x), self._prep(feats.test_x)
        self._calibrations: dict[int, Calibration] = {}
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._new_generation(0)

    def _new_generation(self, epoch: int) -> None:
        """Draw which real sample spawns each generated point of this epoch's balanced set."""
        self.cal = self._calibration(epoch)
        per_sample = spawn_counts(self.feats.train_y, self.feats.num_classes, self.p.extra_points)
        self.point_src = torch.repeat_interleave(torch.arange(len(per_sample), device=per_sample.device),
                                                 per_sample)
        if not self.p.regenerate:  # one-shot TailCalib: the generated set is drawn once and kept
            every = torch.arange(len(self.feats.train_y) + len(self.point_src), device=per_sample.device)
            self.fixed = self._points(every)

    def classifier(self) -> nn.Module:
        return self.head

    def on_epoch_start(self, epoch: int) -> None:
        if self.p.regenerate and epoch > 0:
            self._new_generation(epoch)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) batches of this epoch: a shuffle of the balanced set, generated as drawn."""
        bs = self.ctx.train.batch_size
        size = len(self.feats.train_y) + len(self.point_src)
        order = torch.randperm(size, device=self.cal.rows.device)
        if self.fixed is not None:
            for lo in range(0, size, bs):
                idx = order[lo:lo + bs]
                yield self.fixed[0][idx], self.fixed[1][idx]
            return
        if self.p.steps_per_epoch == "original":
            order = order[: max(len(self.feats.train_y) // bs, 1) * bs]
        chunk = max(CHUNK // bs, 1) * bs
        for lo in range(0, len(order), chunk):
            x, y = self._points(order[lo:lo + chunk])
            for b in range(0, len(y), bs):
                yield x[b:b + bs], y[b:b + bs]

    def batch_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(x), y)

    def logits(self, split: str) -> torch.Tensor:
        return self.head(self.val_x if split == "val" else self.test_x)
