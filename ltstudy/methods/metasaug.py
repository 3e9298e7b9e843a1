"""MetaSAug — Meta Semantic Augmentation for Long-Tailed Visual Recognition (Li et al., CVPR 2021),
after BIT-DA/MetaSAug @ 9efe54a (``MetaSAug_LDAM_train.py``, ``loss.py``).

ISDA surrogate with class-conditional covariances Σ_y of the pooled feature: for a sample with label
y and logits z = W a + b the augmented logits are

    ẑ_j = z_j + ½ λ_t (w_j - w_y)ᵀ Σ_y (w_j - w_y),      λ_t = lam · t / T,

and the loss is the class-balanced (β = ``beta``) CE on ẑ; the LDAM variant (``loss: ldam``) also
subtracts the margin m_y (``ldam_margins(counts, max_m)``) from ẑ_y. Σ_y is tracked by the running
estimator ``CovarianceEstimator`` (the reference's ``EstimatorCV``), ``covariance: full`` (C×A×A) or ``diag`` (C×A, for many
classes). Each step of the MetaSAug phase:

1. Σ (the estimate) becomes a leaf requiring grad;
2. look-ahead θ' = θ - α ∇θ L(θ; batch, Σ) through the whole network (``torch.func.functional_call``,
   ``create_graph=True``), α = the optimiser's current lr;
3. meta loss = plain CE of f_θ' on a balanced meta batch; Σ' = Σ - ``meta_lr`` ∂L_meta/∂Σ;
4. the real update on L(θ; batch, Σ') through the (possibly DDP-wrapped) model; the estimator then
   absorbs the batch's detached features. Σ' is not written back (as in the reference).

Before ``switch`` (a fraction of the epochs; published 160/200 = 0.8) training is plain unweighted CE
with no ISDA, no meta step and no estimator update: the estimator starts (at zero) at the switch, as in
the reference.

Meta set: ``num_meta`` images per class, declared by :meth:`MetaSAug.carved_sets` and carved by the data
layer (seeded by ``seed``): in memory from the images each class's long-tailed profile leaves out, like the
validation set (a class that cannot spare them, the head, gives up training images); from file lists out of
the val list. The meta images are therefore in neither the training set nor the validation set that
selects models.
Meta images get the training augmentation (as in the reference); a meta batch is ``meta_batch``
images drawn without replacement from the meta set (the whole set when it is smaller).

Where ltstudy differs from the reference, and why:

* The meta set comes from the images the profile leaves out, so the training split keeps the standard
  counts (the reference removes 10/class from the CIFAR train pool first and shrinks n_max to 4990/490);
  only the classes that cannot spare the meta images give up training images.
* ``s`` (LDAM logit scale) is exposed; the reference effectively uses s = 1 (no scaling, unnormalised
  linear head). ltstudy's logits are s · (z + ½λ_t q - m_y e_y), equal to the reference at s = 1.
* The CE variant (``loss: ce``) — absent from the reference's CIFAR code — is the same loss without
  the margin (the reference's ImageNet ``Loss_meta``).
* α (look-ahead step) is the lr of the current epoch; the reference evaluates its lr formula with the
  epoch index off by one (e instead of e+1) for the inner step only.
* BN in the look-ahead: the virtual forwards (training batch and meta batch) run in train mode with
  batch statistics, like the reference's fresh meta network, but on **copies** of the BN buffers, so
  the look-ahead never changes the real model's running statistics.
* The meta step runs in float32 (no autocast) — second-order gradients in bf16/fp16 are fragile;
  the real update uses the trainer's ``Amp``.
* Data parallel: the estimator is updated from the sufficient statistics (counts, sums, centred
  outer products) all-reduced over ranks, so every rank holds the same estimate (equal to the
  single-process one for the global batch); the meta-gradient on Σ is averaged over ranks. Each
  rank's look-ahead uses its own shard's gradient (not the global one).
  The real loss is computed from the DDP-wrapped forward's (features, logits); the ISDA term also
  reads ``head.weight`` directly — the same parameter, whose gradients are summed into one
  AccumulateGrad before DDP's hook reduces it, so the update is still synchronised.
* BN under multi-GPU DDP: the trainer converts BatchNorm to SyncBatchNorm, whose backward has no
  derivative of its own, so a second-order look-ahead through it fails. The look-ahead therefore runs on a
  structural twin of the network with plain BatchNorm (same parameter and buffer names, fed the real
  parameters by ``functional_call``): each rank's virtual step normalises with its own shard's statistics,
  as its gradient is its own shard's anyway; the real update keeps SyncBatchNorm.
* File lists and the ImageNet-LT recipe (``train_scope=classifier``): as in the reference's
  ``ImageNet_iNat/train.py``, only the linear classifier of a frozen stage-1 network (``backbone=``, an
  ltstudy checkpoint of the same data, e.g. a ``ce`` trial; its linear head is the starting classifier, as
  the reference starts from cRT's) is trained, and only the classifier takes the virtual step; the
  backbone stays in eval mode. The meta set is carved from the val list (the reference samples it from the
  ImageNet-LT val split) and read with the eval transform, as the reference's ``phase="val"`` loader does;
  its features are computed once, since the backbone is frozen. The reference draws the same first meta
  batch every step (``next(iter(meta_loader))`` without ``set_epoch``); ltstudy draws a fresh random one.
  With ``train_scope=all`` on file lists, meta images are decoded in the training process every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ltstudy.data import SPLIT_VERSION
from ltstudy.data.augment import AugmentSpec, apply, normalize
from ltstudy.data.filelist import FileListDataset
from ltstudy.errors import ConfigError, DataError
from ltstudy.methods.image import ImageMethod
from ltstudy.methods.ldam_drw import class_balanced_weights, ldam_margins
from ltstudy.methods.registry import MethodContext, Params, Recipe, register
from ltstudy.models import Classifier, LinearHead, build_backbone, plain_batchnorm
from ltstudy.runtime import Amp, optimizer_step

# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------


def isda_quadratic(weight: torch.Tensor, cov: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q[i, j] = (w_j - w_u)ᵀ Σ_u (w_j - w_u) for each class u = ``rows[i]``.

    ``cov`` is (C, A, A) (full) or (C, A) (diagonal variances). Returns (len(rows), C); q[i, u] = 0.
    """
    w_rows = weight[rows]  # (U, A)
    if cov.dim() == 3:
        diff = weight.unsqueeze(0) - w_rows.unsqueeze(1)  # (U, C, A)
        return ((diff @ cov[rows]) * diff).sum(-1)
    var = cov[rows]  # (U, A)
    q = (var @ (weight * weight).T - 2.0 * (var * w_rows) @ weight.T
         + (var * w_rows * w_rows).sum(1, keepdim=True))
    self_mask = F.one_hot(rows, weight.shape[0]).to(q.dtype)
    return q * (1.0 - self_mask)  # exact zeros on the own class (the expansion leaves rounding)


def isda_logits(logits: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cov: torch.Tensor,
                lam: float) -> torch.Tensor:
    """ẑ = z + ½ λ q[y] (the ISDA upper-bound logits)."""
    classes, inverse = torch.unique(y, return_inverse=True)
    q = isda_quadratic(weight.float(), cov.float(), classes)
    return logits.float() + 0.5 * lam * q[inverse]


def metasaug_loss(logits: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cov: torch.Tensor,
                  lam: float, margins: torch.Tensor | None = None, s: float = 1.0,
                  class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted CE on s · (ẑ - m_y e_y); ``margins=None`` is the CE (no-LDAM) variant."""
    z = isda_logits(logits, weight, y, cov, lam)
    if margins is not None:
        z = z - F.one_hot(y, z.shape[1]).to(z.dtype) * margins[y].unsqueeze(1)
    return F.cross_entropy(s * z, y, weight=class_weight)


class CovarianceEstimator:
    """Running per-class feature mean and covariance, full (C,A,A) or diagonal (C,A).

    For each class c in a batch with n_b samples, mean μ_b and biased covariance S_b, and state
    (N, μ, Σ), ω = n_b / (n_b + N):  Σ ← (1-ω)Σ + ω S_b + ω(1-ω)(μ - μ_b)(μ - μ_b)ᵀ,
    μ ← (1-ω)μ + ω μ_b, N ← N + n_b. Absent classes are unchanged.
    """

    def __init__(self, num_classes: int, dim: int, full: bool = True, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.full = full
        self.count = torch.zeros(num_classes, device=device, dtype=dtype)
        self.mean = torch.zeros(num_classes, dim, device=device, dtype=dtype)
        shape = (num_classes, dim, dim) if full else (num_classes, dim)
        self.cov = torch.zeros(shape, device=device, dtype=dtype)

    @staticmethod
    def _all_reduce(t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return t

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        x = features.detach().to(self.mean.dtype)
        c, a = self.mean.shape
        n_b = self._all_reduce(torch.bincount(labels, minlength=c).to(x.dtype))
        sums = self._all_reduce(torch.zeros(c, a, dtype=x.dtype, device=x.device).index_add_(0, labels, x))
        mu_b = sums / n_b.clamp_min(1).unsqueeze(1)
        xc = x - mu_b[labels]
        if self.full:
            outer = torch.zeros_like(self.cov).index_add_(0, labels, xc.unsqueeze(2) * xc.unsqueeze(1))
            s_b = self._all_reduce(outer) / n_b.clamp_min(1).view(c, 1, 1)
        else:
            s_b = self._all_reduce(torch.zeros_like(self.cov).index_add_(0, labels, xc * xc))
            s_b = s_b / n_b.clamp_min(1).unsqueeze(1)
        omega = n_b / (n_b + self.count).clamp_min(1)  # 0 for absent classes
        d = self.mean - mu_b
        if self.full:
            om = omega.view(c, 1, 1)
            self.cov = (1 - om) * self.cov + om * s_b + om * (1 - om) * d.unsqueeze(2) * d.unsqueeze(1)
        else:
            om = omega.unsqueeze(1)
            self.cov = (1 - om) * self.cov + om * s_b + om * (1 - om) * d * d
        self.mean = (1 - omega.unsqueeze(1)) * self.mean + omega.unsqueeze(1) * mu_b
        self.count = self.count + n_b

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "cov": self.cov.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.mean.device
        self.count, self.mean, self.cov = (state[k].to(dev) for k in ("count", "mean", "cov"))


def lookahead_meta_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                        inner_lr: float, x_meta: torch.Tensor, y_meta: torch.Tensor, lam: float,
                        margins: torch.Tensor | None, s: float,
                        class_weight: torch.Tensor | None) -> torch.Tensor:
    """CE(f_θ'(x_meta), y_meta) with θ' = θ - inner_lr ∇θ L(θ; x, y, Σ) (``create_graph=True``).

    ``module`` must return ``(features, logits)`` for ``with_features=True`` and have a
    ``head.weight``. Both virtual forwards run in the module's current mode on **copies** of its
    buffers, so BN running statistics of the real model are not touched.
    """
    params = dict(module.named_parameters())
    names = [k for k, p in params.items() if p.requires_grad]
    buffers = {k: b.clone() for k, b in module.named_buffers()}
    _, z = functional_call(module, {**params, **buffers}, (x,), {"with_features": True})
    inner = metasaug_loss(z, params["head.weight"], y, sigma, lam, margins, s, class_weight)
    grads = torch.autograd.grad(inner, [params[k] for k in names], create_graph=True, allow_unused=True)
    fast = dict(params)
    for k, g in zip(names, grads, strict=True):
        if g is not None:
            fast[k] = params[k] - inner_lr * g
    meta_logits = functional_call(module, {**fast, **buffers}, (x_meta,))
    return F.cross_entropy(meta_logits.float(), y_meta)


def meta_step_covariance(module: nn.Module, x: torch.Tensor, y: torch.Tensor, cov: torch.Tensor,
                         inner_lr: float, x_meta: torch.Tensor, y_meta: torch.Tensor, meta_lr: float,
                         lam: float, margins: torch.Tensor | None = None, s: float = 1.0,
                         class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ' = Σ - meta_lr ∂L_meta/∂Σ; the meta-gradient is averaged over data-parallel ranks."""
    sigma = cov.detach().clone().requires_grad_(True)
    meta_loss = lookahead_meta_loss(module, x, y, sigma, inner_lr, x_meta, y_meta, lam, margins, s,
                                    class_weight)
    (g_sigma,) = torch.autograd.grad(meta_loss, sigma)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(g_sigma)
        g_sigma /= dist.get_world_size()
    return (sigma - meta_lr * g_sigma).detach()


# ----------------------------------------------------------------------------------------------
# Model and method
# ----------------------------------------------------------------------------------------------


class MetaSAugNet(Classifier):
    """Backbone + plain linear classifier; ``forward(x, with_features=True)`` returns (a, z).

    ``forward(f, from_features=True)`` skips the backbone (the classifier-only recipe computes the frozen
    backbone's features once per step and sends only the classifier through DDP). A frozen backbone stays in
    eval mode whatever mode the network is put in.
    """

    frozen_backbone = False

    def forward(self, x: torch.Tensor, with_features: bool = False, from_features: bool = False) -> Any:
        f = x if from_features else self.backbone(x)
        z = self.head(f)
        return (f, z) if with_features else z

    def freeze_backbone(self) -> None:
        self.frozen_backbone = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> MetaSAugNet:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self


class HeadOnly(nn.Module):
    """The classifier alone, with :class:`MetaSAugNet`'s interface on features: the look-ahead module of the
    classifier-only recipe, where only the FC takes the virtual step (as in the reference's ImageNet code)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, f: torch.Tensor, with_features: bool = False) -> Any:
        z = self.head(f)
        return (f, z) if with_features else z


def load_stage1(net: MetaSAugNet, path: str) -> None:
    """Load an ltstudy checkpoint's backbone (strictly) and, when it is a linear head of the same shape, its
    classifier into ``net``; a normed or cosine stage-1 head leaves the classifier freshly initialised."""
    file = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"metasaug: stage-1 checkpoint not found: {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise DataError(f"{file} is not an ltstudy checkpoint (no 'model')")
    version = int(state.get("split_version", 1))
    if version != SPLIT_VERSION:
        raise ConfigError(f"stage-1 checkpoint {file} was trained on ltstudy's split version {version}, this "
                          f"ltstudy draws version {SPLIT_VERSION}: retrain it")
    weights = state["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}
    try:
        net.backbone.load_state_dict(backbone)
    except RuntimeError as exc:
        raise DataError(f"stage-1 checkpoint {file} does not fit model {type(net.backbone).__name__}: "
                        f"{str(exc).splitlines()[0]}") from None
    head = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
    own = net.head.state_dict()
    if head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
        net.head.load_state_dict(head)


class MetaSAugParams(Params):
    lam: float = Field(0.75, ge=0.0, description="ISDA strength λ0, λ_t = λ0·t/T (0.75 = README CIFAR)")
    meta_lr: float = Field(0.1, gt=0.0, description="step size of the meta update of Σ")
    num_meta: int = Field(10, ge=1, description="meta images per class, carved from the training pool")
    switch: float = Field(0.8, ge=0.0, le=1.0, description="fraction of epochs of plain CE before MetaSAug")
    max_m: float = Field(0.5, ge=0.0, description="largest LDAM margin (loss=ldam)")
    s: float = Field(1.0, gt=0.0, description="logit scale (reference code: effectively 1)")
    beta: float = Field(0.9999, ge=0.0, lt=1.0, description="class-balanced weight β (MetaSAug phase)")
    loss: Literal["ce", "ldam"] = Field("ldam", description="ISDA on CE or on LDAM margins")
    covariance: Literal["full", "diag"] = Field("full", description="full or diagonal class covariance")
    meta_batch: int = Field(100, ge=1, description="images per meta batch")
    train_scope: Literal["all", "classifier"] = Field(
        "all", description="train the whole network (CIFAR recipe) or only the classifier of the frozen "
                           "stage-1 network in backbone=CHECKPOINT (the reference's ImageNet-LT recipe)")


_CIFAR = {"model": "resnet32", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
          "batch_size": 100, "epochs": 200, "optimizer": "sgd", "warmup_epochs": 0, "schedule": "step",
          "gamma": 0.01, "crop_pad_mode": "reflect", "lam": 0.75, "meta_lr": 0.1, "num_meta": 10,
          "switch": 0.8, "loss": "ldam", "max_m": 0.5, "s": 1.0, "beta": 0.9999, "covariance": "full",
          "meta_batch": 100}
_CIFAR_SOURCE = ("BIT-DA/MetaSAug README command (MetaSAug_LDAM_train.py): ResNet-32, SGD lr 0.1 Nesterov "
                 "momentum 0.9 wd 5e-4, batch 100, 200 epochs, plain CE until epoch 160, lr x0.01 at 160 and "
                 "180, reflect-padded crops; lam 0.75, meta_lr 0.1, 10 meta images per class, LDAM margins "
                 "(max_m 0.5, no scale), class-balanced beta 0.9999, full covariance")
_IMAGENET = {"model": "resnet50", "train_scope": "classifier", "lr": 3e-4, "momentum": 0.9, "nesterov": True,
             "weight_decay": 5e-4, "batch_size": 256, "epochs": 20, "optimizer": "sgd", "warmup_epochs": 0,
             "schedule": "constant", "lam": 0.25, "meta_lr": 0.1, "num_meta": 10, "switch": 0.0, "loss": "ce",
             "s": 1.0, "beta": 0.9999, "covariance": "diag", "meta_batch": 64}
_IMAGENET_SOURCE = ("BIT-DA/MetaSAug ImageNet_iNat/train.py and README command: the classifier of a frozen "
                    "stage-1 ResNet-50 (backbone=CHECKPOINT, e.g. a ce trial; the reference starts from cRT's "
                    "resnet50_uniform_e90), SGD lr 3e-4 Nesterov momentum 0.9 wd 5e-4, constant lr, batch 256, "
                    "20 epochs; ISDA on CE with diagonal covariance and class-balanced weights from the start, "
                    "lam 0.25, meta_lr 0.1, 10 meta images per class from the val list (eval transform)")


@register
class MetaSAug(ImageMethod):
    name = "metasaug"
    summary = "ISDA with meta-learned class covariances (LDAM/CE), deferred class-balanced weights"
    Params = MetaSAugParams
    recipes = {
        "cifar10": Recipe(_CIFAR, _CIFAR_SOURCE),
        "cifar100": Recipe(_CIFAR, _CIFAR_SOURCE),
        "imagenet": Recipe(_IMAGENET, _IMAGENET_SOURCE),
    }

    @classmethod
    def lr_milestones(cls, params: MetaSAugParams) -> tuple[float, ...]:
        return (params.switch, (1.0 + params.switch) / 2)

    @classmethod
    def check(cls, train: Any, params: MetaSAugParams) -> None:
        if params.train_scope == "classifier" and not train.backbone:
            raise ConfigError("metasaug train_scope=classifier (the ImageNet-LT recipe) trains the classifier of "
                              "a frozen stage-1 network: set backbone=CHECKPOINT (e.g. a ce trial on the same "
                              "data), or train_scope=all to train the whole network")

    @classmethod
    def carved_sets(cls, params: MetaSAugParams) -> dict[str, int]:
        return {"meta": params.num_meta}

    @classmethod
    def phase_epochs(cls, params: MetaSAugParams, epochs: int) -> list[int]:
        return [int(params.switch * epochs)]

    def __init__(self, params: MetaSAugParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        self.margins = (ldam_margins(ctx.class_counts, params.max_m).to(ctx.device)
                        if params.loss == "ldam" else None)
        self.cb_weights = class_balanced_weights(ctx.class_counts, params.beta).to(ctx.device)
        (self.switch_epoch,) = self.phase_epochs(params, ctx.epochs)
        self.epoch = 0
        self.estimator: CovarianceEstimator | None = None
        self.augment = AugmentSpec.of(ctx.train)
        if ctx.data is None or "meta" not in ctx.data.carved:
            raise ConfigError("metasaug needs its meta set carved from the data (MetaSAug.carved_sets)")
        self.meta = ctx.data.carved["meta"]
        self.classifier_only = params.train_scope == "classifier"
        self._twin: nn.Module | None = None  # plain-BN twin of a SyncBatchNorm network, for the look-ahead
        self._meta_features: torch.Tensor | None = None  # classifier-only recipe on file lists

    # -- schedule --------------------------------------------------------------------------

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def meta_phase(self) -> bool:
        return self.epoch >= self.switch_epoch

    @property
    def lam_t(self) -> float:
        return self.p.lam * self.epoch / self.ctx.epochs

    # -- model -----------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        backbone = build_backbone(self.ctx.model_name, **self.ctx.model_options)
        net = MetaSAugNet(backbone, LinearHead(int(backbone.feature_dim), self.ctx.num_classes))
        if self.classifier_only:
            load_stage1(net, self.ctx.train.backbone)
            net.freeze_backbone()
        return net

    def covariance_estimator(self, dim: int) -> CovarianceEstimator:
        if self.estimator is None:
            self.estimator = CovarianceEstimator(self.ctx.num_classes, dim, self.p.covariance == "full",
                                                 self.ctx.device)
        return self.estimator

    def _meta_images(self, pick: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Meta images: the training augmentation in memory (CIFAR reference), the eval transform from file
        lists (the reference's ImageNet meta loader); decoded here, in the training process."""
        data = self.ctx.data
        if self.meta.images is not None:
            return apply(self.augment, self.meta.images[pick].to(device), data.mean, data.std)
        ds = FileListDataset(data.image_root, self.meta.paths, self.meta.labels.numpy(), size=data.image_size,
                             train=False)
        return normalize(torch.stack([ds[i][0] for i in pick.tolist()]).to(device), data.mean, data.std)

    @torch.no_grad()
    def _all_meta_features(self, module: MetaSAugNet, device: torch.device) -> torch.Tensor:
        """Frozen backbone, eval transform: the meta features never change, so they are computed once."""
        if self._meta_features is None:
            assert self.ctx.make_loader is not None
            t = self.ctx.train
            loader = self.ctx.make_loader("meta", batch_size=t.eval_batch_size, device=device, train=False,
                                          num_workers=t.num_workers)
            self._meta_features = torch.cat([module.backbone(x).float() for x, _ in loader])
        return self._meta_features

    def _meta_batch(self, module: MetaSAugNet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random meta batch: images for the whole-network look-ahead, features for the classifier-only one."""
        n = len(self.meta)
        pick = torch.randperm(n)[: min(self.p.meta_batch, n)]
        y = self.meta.labels[pick].to(device)
        if not self.classifier_only:
            return self._meta_images(pick, device), y
        if self.meta.images is None:
            return self._all_meta_features(module, device)[pick.to(device)], y
        with torch.no_grad():
            return module.backbone(self._meta_images(pick, device)).float(), y

    def lookahead_module(self, module: nn.Module) -> nn.Module:
        """What takes the virtual step: the classifier alone, or the network (its plain-BN twin under
        SyncBatchNorm, whose backward cannot be differentiated again)."""
        if self.classifier_only:
            return HeadOnly(module.head)
        if not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
            return module
        if self._twin is None:
            self._twin = plain_batchnorm(module)
        return self._twin.train(module.training)

    def meta_covariance(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, cov: torch.Tensor,
                        inner_lr: float, x_meta: torch.Tensor, y_meta: torch.Tensor) -> torch.Tensor:
        """Σ' = Σ - meta_lr ∂L_meta/∂Σ (see :func:`lookahead_meta_loss`)."""
        return meta_step_covariance(module, x, y, cov, inner_lr, x_meta, y_meta, self.p.meta_lr,
                                    self.lam_t, self.margins, self.p.s, self.cb_weights)

    def train_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                   amp: Amp) -> torch.Tensor:
        x, y = batch
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        kw: dict[str, Any] = {}
        if self.classifier_only:  # the frozen backbone runs once, without a graph; only the FC goes to DDP
            with torch.no_grad(), amp.autocast():
                x = module.backbone(x).float()
            kw = {"from_features": True}
        if not self.meta_phase:
            with amp.autocast():
                loss = F.cross_entropy(model(x, **kw).float(), y)
            return optimizer_step(optimizer, loss, amp)
        est = self.covariance_estimator(int(module.feature_dim))
        x_meta, y_meta = self._meta_batch(module, x.device)
        new_cov = self.meta_covariance(self.lookahead_module(module), x, y, est.cov,
                                       optimizer.param_groups[0]["lr"], x_meta, y_meta)
        with amp.autocast():
            feats, z = model(x, with_features=True, **kw)
        loss = metasaug_loss(z, module.head.weight, y, new_cov, self.lam_t, self.margins, self.p.s,
                             self.cb_weights)
        optimizer_step(optimizer, loss, amp)
        est.update(feats.float(), y)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": None if self.estimator is None else self.estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        est = state.get("estimator")
        if est is None:
            self.estimator = None
            return
        dim = est["mean"].shape[1]
        self.covariance_estimator(dim).load_state_dict(est)
