"""FSGL — Feature Scaling Guided Learning (Wang, You, Zheng), after ZY-IMU-CV/FSGL @ 6dbc786.

FSGL is GLMC (Du et al., CVPR 2023; ynu-yangpeng/GLMC @ 2c0261c) plus a Feature Scaling Module (FSM)
and a SAM optimiser. One training step:

1. Two lockstep batches: "org" (the trainer's sampler, instance-balanced by default) and "invs"
   (drawn with replacement with per-sample weights n_y^-q, q = ``resample_weighting``); every image
   is augmented twice independently (view 1, view 2).
2. Global-local mixture with one λ ~ Beta(α, α) (α = ``mix_alpha``): MixUp of the view-1 pair and
   CutMix of the view-2 pair. Soft labels y = λ e_a + (1-λ) e_b and re-weighted labels
   y^w = λ w_a e_a + (1-λ) w_b e_b with w_k = n_k^-τ normalised to sum C (τ = ``label_weighting``).
3. FSM: the pooled feature is multiplied by φ = Σ_k y_k s_k, s_k = 1 + γ - r_k γ / C, where r_k is
   class k's frequency rank (0 = most frequent) and γ = ``fcc``; identity at test time. The scaled
   feature feeds all four heads: ``fc`` (balanced), ``head`` (= the reference's ``fc_cb``,
   rebalanced, used alone at test time), ``projection`` (Linear D→D/2) and ``contrast``
   (Linear D/2→D/2).
4. Loss L = α_t L_bal + (1-α_t) L_reb + ``contrast_weight`` · L_con with α_t = 1 - (t/T)^p
   (p = ``cumulative_power``), soft CE for L_bal / L_reb and a SimSiam negative cosine with
   stop-gradient for L_con.
5. SAM with radius ``rho`` (ρ ≤ 0: a plain step of the trainer's optimiser).

Where ltstudy differs from the reference, and why:

* **FSM uses the frequency rank, not the class index.** The reference computes s_k from k, which is
  the frequency rank only on CIFAR-LT; with ties broken by class index the CIFAR factors are the same
  (C = 10, γ = 0.5: 1.50, 1.45, ..., 1.05). The factors are **not rounded** to 2 decimals (the reference
  rounds; for C=10, γ=0.5 the values coincide).
* **CutMix label uses the pasted area after clipping** the box to the image; the reference labels the
  cut image with the sampled λ even when the box is clipped. φ (FSM) uses the same corrected λ.
* **SAM's ascent step uses the full loss** (L_cls + contrast_weight · L_con). The reference's first
  pass omits the contrast term, so it perturbs towards a different objective than the one it
  descends; and the released ``sam.py`` cannot have run as shipped (its first step raises
  ``KeyError: 'old_p'``), so a working SAM is a necessary fix. ltstudy perturbs and descends on the same
  loss.
* ``mix_alpha`` is a real hyperparameter (published value 1.0, hard-coded in the reference); the
  reference's ``--beta`` flag is parsed but unused and is not reproduced.
* As in the reference, the MixUp and the CutMix batch take **two forwards** (BatchNorm normalises each
  with its own statistics), inside one call of the model so that the DDP-wrapped forward computes the
  whole loss; the CutMix box side is ⌈H√(1-λ)⌉ (ceil, GLMC's ``rand_bbox``).
* Under a float16 ``GradScaler`` (GPUs without bf16) the SAM step runs in float32 without the scaler:
  SAM needs the true gradient norm before the second pass, and an extra unscale/inf-check round would
  double the bookkeeping for a rare setting. bf16 autocast and CPU are unaffected.
* BN running statistics are updated by both SAM forward passes, as in the reference.
* The loss reported per step is the first-pass loss (at w, before the perturbation).
* File lists (ImageNet-LT): each image is decoded once and augmented twice by the loader's workers (the
  reference's ``TwoCropTransform``), with the MoCo-v2 pipeline of the recipe (``color_augment``); the
  reference picks that pipeline or a RandAugment one by a coin flip when it starts, ltstudy always the
  former. Its lr schedule (10 warm-up epochs, then cosine) runs warm-up epoch e at (e+1)/10 of the base
  lr; the reference, stepping at the end of each epoch, runs epoch 0 at the full lr and epoch 10 at 1.1x.
* ``model`` selects the backbone (published: ``resnet34_cifar`` on CIFAR, ``resnext50_32x4d`` on
  ImageNet-LT; ``resnet32`` for fast studies); the heads are sized from its feature dimension (projection
  width min(D/2, 256), as in both references).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.data.loader import LockstepLoader, derive_seed
from ltstudy.methods.image import ImageMethod
from ltstudy.methods.registry import MethodContext, Params, Recipe, register
from ltstudy.models import Classifier, build_backbone
from ltstudy.runtime import Amp, optimizer_step

# ----------------------------------------------------------------------------------------------
# The maths (pure functions, unit-tested without data)
# ----------------------------------------------------------------------------------------------


def frequency_ranks(class_counts: torch.Tensor) -> torch.Tensor:
    """r_k: 0 for the most frequent class, C-1 for the rarest; ties broken by class index."""
    counts = torch.as_tensor(class_counts).long().cpu()
    order = sorted(range(len(counts)), key=lambda k: (-int(counts[k]), k))
    ranks = torch.empty(len(counts), dtype=torch.long)
    ranks[torch.tensor(order)] = torch.arange(len(counts))
    return ranks


def fsm_factors(class_counts: torch.Tensor, fcc: float) -> torch.Tensor:
    """Per-class FSM factors s_k = 1 + fcc - r_k fcc / C (float64, not rounded)."""
    ranks = frequency_ranks(class_counts).double()
    c = len(ranks)
    return 1.0 + fcc - ranks * fcc / c


def label_weights(class_counts: torch.Tensor, tau: float) -> torch.Tensor:
    """w_k = n_k^-τ normalised so that Σ_k w_k = C."""
    w = torch.as_tensor(class_counts).double().clamp_min(1).pow(-tau)
    return w / w.sum() * len(w)


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The CutMix box (y0, y1, x0, x1) around (cy, cx), clipped: as GLMC's ``rand_bbox``, the side is
    ⌈H√(1-λ)⌉ (ceil) and the box spans centre ± side // 2."""
    rat = math.sqrt(max(1.0 - lam, 0.0))
    ch, cw = math.ceil(height * rat), math.ceil(width * rat)
    y0, y1 = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
    x0, x1 = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
    return y0, y1, x0, x1


def cutmix(x_a: torch.Tensor, x_b: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, float]:
    """Paste ``box`` of ``x_b`` into ``x_a``; returns the image and the label weight of ``x_a``.

    The weight is 1 - (pasted area)/(H W), i.e. corrected for clipping (the reference keeps λ).
    """
    y0, y1, x0, x1 = box
    out = x_a.clone()
    out[:, :, y0:y1, x0:x1] = x_b[:, :, y0:y1, x0:x1]
    h, w = x_a.shape[-2:]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean_i Σ_j target_ij log softmax(logits_i)_j (targets need not sum to 1)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def simsiam_consistency(p_mix: torch.Tensor, h_mix: torch.Tensor, p_cut: torch.Tensor,
                        h_cut: torch.Tensor) -> torch.Tensor:
    """-cos(p_mix, sg(h_cut)) - cos(p_cut, sg(h_mix)), each averaged over the batch."""
    return -(F.cosine_similarity(p_mix, h_cut.detach(), dim=1).mean()
             + F.cosine_similarity(p_cut, h_mix.detach(), dim=1).mean())


def sam_step(params: list[torch.Tensor], closure: Callable[[], torch.Tensor],
             optimizer: torch.optim.Optimizer, rho: float) -> torch.Tensor:
    """One SAM update (Foret et al., non-adaptive) around ``optimizer``.

    ``closure`` runs a forward pass and returns the loss (no backward). Steps: g = ∇L(w);
    e = ρ g / ‖g‖₂ (norm over all parameters); w ← w + e; g' = ∇L(w + e); w ← w; optimizer step with g'.
    Returns the detached first-pass loss.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    with torch.no_grad():
        live = [p for p in params if p.grad is not None]
        if not live:
            raise RuntimeError("SAM: no parameter received a gradient")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in live]))
        scale = rho / (norm + 1e-12)
        saved = [p.detach().clone() for p in live]
        for p in live:
            p.add_(p.grad * scale)
    optimizer.zero_grad(set_to_none=True)
    closure().backward()
    with torch.no_grad():
        for p, w in zip(live, saved, strict=True):
            p.copy_(w)
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class FSGLNet(Classifier):
    """Backbone + four heads; ``head`` is the rebalanced classifier (the reference's ``fc_cb``).

    ``forward(x)`` gives test-time logits ``head(f)``. ``forward(xs, phis)`` with sequences of batches and
    their FSM factors (B,) runs each batch through the network on its own, as the reference's two forwards
    do (so BatchNorm normalises the MixUp and the CutMix batch separately), and returns one
    ``(fc, head, projection, contrast)`` tuple per batch. One call is one DDP forward however many batches
    it holds.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        dim = int(backbone.feature_dim)
        super().__init__(backbone, nn.Linear(dim, num_classes))
        hidden = max(min(dim // 2, 256), 1)  # 256 for ResNet-34 / ResNeXt-50, as in both references
        self.fc = nn.Linear(dim, num_classes)
        self.projection = nn.Linear(dim, hidden)
        self.contrast = nn.Linear(hidden, hidden)

    def _heads(self, x: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.backbone(x)
        f = f * phi.to(f.dtype).unsqueeze(1)
        h = self.projection(f)
        return self.fc(f), self.head(f), h, self.contrast(h)

    def forward(self, x: Any, phi: Any = None) -> Any:
        if phi is None:
            return self.head(self.backbone(x))
        return [self._heads(xi, pi) for xi, pi in zip(x, phi, strict=True)]


# ----------------------------------------------------------------------------------------------
# Method
# ----------------------------------------------------------------------------------------------


#: the CIFAR commands of the FSGL README (IF 50; the same flags at IF 100)
_CIFAR = {"model": "resnet34_cifar", "lr": 0.01, "weight_decay": 5e-3, "batch_size": 64, "epochs": 200,
          "momentum": 0.9, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 0, "rho": 0.05,
          "contrast_weight": 4.0, "label_weighting": 1.2, "resample_weighting": 0.0, "mix_alpha": 1.0,
          "cumulative_power": 2.0}
_CIFAR_SOURCE = ("ResNet-34 (CIFAR stem), SGD lr 0.01 momentum 0.9 wd 5e-3, batch 64, 200 epochs, cosine, "
                 "rho 0.05, contrast_weight 4, label_weighting 1.2, resample_weighting 0.0")


class FSGLParams(Params):
    fcc: float = Field(0.5, ge=0.0, description="FSM strength γ: head factor 1+γ, tail ≈ 1+γ/C (published: "
                                                "0.5 CIFAR-10, 1.0 CIFAR-100, 0.1 ImageNet-LT; 0 = GLMC)")
    rho: float = Field(0.05, description="SAM radius ρ; ρ ≤ 0 = plain optimiser step (GLMC)")
    contrast_weight: float = Field(4.0, ge=0.0, description="weight of the SimSiam consistency loss")
    label_weighting: float = Field(1.2, ge=0.0, description="τ of the rebalanced label weights n_k^-τ")
    resample_weighting: float = Field(0.0, ge=0.0, description="q of the invs sampler weights n_y^-q")
    mix_alpha: float = Field(1.0, gt=0.0, description="MixUp/CutMix λ ~ Beta(α, α)")
    cumulative_power: float = Field(2.0, gt=0.0, description="p of the cumulative mix α_t = 1-(t/T)^p")


@register
class FSGL(ImageMethod):
    name = "fsgl"
    summary = "GLMC two-branch global-local mixture + feature scaling module + SAM"
    Params = FSGLParams
    recipes = {
        "cifar10": Recipe({**_CIFAR, "fcc": 0.5}, "ZY-IMU-CV/FSGL README, CIFAR-10-LT command: " + _CIFAR_SOURCE
                          + ", fcc 0.5"),
        "cifar100": Recipe({**_CIFAR, "fcc": 1.0}, "ZY-IMU-CV/FSGL README, CIFAR-100-LT command: " + _CIFAR_SOURCE
                           + ", fcc 1.0"),
        "imagenet": Recipe(
            {"model": "resnext50_32x4d", "lr": 0.1, "weight_decay": 2e-4, "batch_size": 120, "epochs": 135,
             "momentum": 0.9, "optimizer": "sgd", "schedule": "cosine", "warmup_epochs": 10,
             "color_augment": True, "fcc": 0.1, "rho": 0.05, "contrast_weight": 4.0, "label_weighting": 1.0,
             "resample_weighting": 0.2, "mix_alpha": 1.0, "cumulative_power": 2.0},
            "ZY-IMU-CV/FSGL README, ImageNet-LT command: ResNeXt-50, SGD lr 0.1 momentum 0.9 wd 2e-4, batch 120, "
            "135 epochs, 10 warm-up epochs then cosine (Trainer.paco_adjust_learning_rate), MoCo-v2 augmentation, "
            "fcc 0.1, rho 0.05, contrast_weight 4, label_weighting 1.0, resample_weighting 0.2 (run.sh differs: "
            "200 epochs, batch 64, resample 0.0)"),
    }

    def __init__(self, params: FSGLParams, ctx: MethodContext) -> None:
        super().__init__(params, ctx)
        counts = ctx.class_counts
        self.scales = fsm_factors(counts, params.fcc).float().to(ctx.device)
        self.label_w = label_weights(counts, params.label_weighting).float().to(ctx.device)
        alpha = torch.tensor(float(params.mix_alpha))
        self._beta = torch.distributions.Beta(alpha, alpha)
        self.alpha_t = 1.0

    def build_model(self) -> nn.Module:
        return FSGLNet(build_backbone(self.ctx.model_name, **self.ctx.model_options), self.ctx.num_classes)

    @classmethod
    def phase_epochs(cls, params: FSGLParams, epochs: int) -> list[int]:
        """The epoch where the re-balanced branch starts to weigh more than the balanced one: the first t
        with α_t = 1-(t/T)^p <= 1/2, t = ceil(T·2^(-1/p)) (100, 142, 159 of 200 for p = 1, 2, 3). The
        re-weighting acts gradually, but before this epoch it is the lesser part of the loss, so a trial
        judged earlier has mostly shown its balanced branch."""
        return [math.ceil(epochs * 0.5 ** (1.0 / params.cumulative_power) - 1e-9)]

    def on_epoch_start(self, epoch: int) -> None:
        self.alpha_t = 1.0 - (epoch / self.ctx.epochs) ** self.p.cumulative_power

    def train_loader(self, **kw: Any) -> LockstepLoader:
        """"org" (the trainer's sampler) and "invs" (n_y^-q draws with replacement) batches in lockstep,
        every image augmented twice: ``(o1, o2, y_o, i1, i2, y_i)``, in memory or from file lists."""
        assert self.ctx.make_loader is not None
        kw = {**kw, "views": 2}
        org = self.ctx.make_loader("train", **kw)
        seed = kw.get("seed", self.ctx.train.seed if self.ctx.train is not None else 0)
        inv = self.ctx.make_loader("train", **{**kw, "sampler": "power", "sampler_q": self.p.resample_weighting,
                                               "seed": derive_seed(seed, 0, 3)})
        return LockstepLoader(org, inv)

    def mix(self, batch: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """((x_mix, x_cut), (φ_mix, φ_cut), y, y^w); the labels are of [MixUp; CutMix], 2B rows."""
        o1, o2, y_o, i1, i2, y_i = batch
        c = self.ctx.num_classes
        lam = float(self._beta.sample())
        h, w = o2.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        x_cut, lam_cut = cutmix(o2, i2, cutmix_box(h, w, lam, cy, cx))
        x_mix = lam * o1 + (1.0 - lam) * i1
        e_o, e_i = F.one_hot(y_o, c).float(), F.one_hot(y_i, c).float()
        lams = torch.cat([torch.full((len(y_o),), lam), torch.full((len(y_o),), lam_cut)]).to(o1.device)
        lams = lams.unsqueeze(1)
        e_a, e_b = torch.cat([e_o, e_o]), torch.cat([e_i, e_i])
        y = lams * e_a + (1 - lams) * e_b
        y_w = lams * self.label_w * e_a + (1 - lams) * self.label_w * e_b
        phi = y @ self.scales
        b = len(y_o)
        return (x_mix, x_cut), (phi[:b], phi[b:]), y, y_w

    def loss_from_outputs(self, outputs: list[tuple[torch.Tensor, ...]], y: torch.Tensor,
                          y_w: torch.Tensor) -> torch.Tensor:
        """The FSGL loss from the MixUp and CutMix forwards' (fc, head, projection, contrast) outputs."""
        z, z_cb, h, p = (torch.cat([mix.float(), cut.float()]) for mix, cut in zip(*outputs, strict=True))
        b = len(y) // 2
        l_bal = soft_ce(z[:b], y[:b]) + soft_ce(z[b:], y[b:])
        l_reb = soft_ce(z_cb[:b], y_w[:b]) + soft_ce(z_cb[b:], y_w[b:])
        l_con = simsiam_consistency(p[:b], h[:b], p[b:], h[b:])
        return self.alpha_t * l_bal + (1.0 - self.alpha_t) * l_reb + self.p.contrast_weight * l_con

    def train_step(self, model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                   amp: Amp) -> torch.Tensor:
        x, phi, y, y_w = self.mix(batch)
        if self.p.rho <= 0:
            with amp.autocast():
                loss = self.loss_from_outputs(model(x, phi), y, y_w)
            return optimizer_step(optimizer, loss, amp)
        ctx_amp = amp if amp.scaler is None else Amp(device_type=amp.device_type)

        def closure() -> torch.Tensor:
            with ctx_amp.autocast():
                return self.loss_from_outputs(model(x, phi), y, y_w)

        params = [p for g in optimizer.param_groups for p in g["params"]]
        return sam_step(params, closure, optimizer, self.p.rho)
