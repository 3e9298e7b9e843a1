"""DLSA — dynamic label space adjustment (Xu, Li, Li, Lu, "Constructing Balance from Imbalance for
Long-tailed Image Recognition", ECCV 2022). Reference: silicx/DLSA @ 9559ab6 (``train_dlsa.py``,
``models/FlowGMM.py``, ``models/Flows.py``, ``models/Classifiers.py``, ``models/losses.py``).

On frozen features, recursively for ``max_depth`` levels: fit a FlowGMM (MAF: ``n_blocks`` × [MADE,
BatchNorm flow], latent mixture of ``num_cluster`` unit Gaussians with fixed random means of std
``gmm_center_std``) on the remaining train samples with the likelihood, purity and balance losses; route
the most likely ``llh_proportion`` share (threshold = train quantile) of the remaining train / val / test
samples to a cluster-aided classifier (CAC: Lin(x) + Lin([x, P]) with P the sample's cluster class
histogram); the rest go down a level, and a regular classifier (Lin(x) + Lin(x)) takes what is left.
Classifiers use Balanced Softmax. Defaults: the ImageNet-LT CE-feature config (``ImgNet_CE_R50_bsm``:
max_depth 1, K 500, flow SGD lr 0.2 × 50 epochs, batch 1024, λ_lh 2, λ_bal 1, λ_pur 0.02, momentum 0.7,
ρ 0.3; classifiers SGD lr 1e-2, momentum 0, no wd, batch 128, 150 epochs).

Where ltstudy differs from the reference, and why:

* **Small data.** K is capped at the number of train samples being clustered (a GMM with more
  components than points is meaningless; on CIFAR-scale data set ``num_cluster`` lower, e.g. 50–100), and
  the flow batch at that number too.
* **Selection never on test.** The reference restores the best-on-test classifier weights; ltstudy
  reports val every epoch and test once at the end. The flow epoch is chosen on train only, as in the
  reference (most clusters with purity > ``min_purity`` and size > ``min_size``, largest cluster < 5000).
* **Val is routed like test** (the reference has no val split).
* All classifiers train in the same epoch loop (one pass over each one's samples per epoch) so that an
  epoch reports one combined val metric; the reference trains them one after another.
* The regular classifier's Balanced-Softmax prior counts all training labels, as in the reference; the
  CAC's counts only its routed samples (absent classes: log 1e-6), as in the reference.
* Lin_x is freshly initialised (the CE config has no ``backbone_weight_path``).
* **A diverged flow fails the trial.** When the flow's loss or its log-likelihood becomes non-finite, the
  trial stops with ``NonFiniteLossError`` (a FAILED study trial, as for a non-finite training loss)
  instead of routing nothing (a NaN quantile) and quietly training Balanced Softmax alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ltstudy.errors import NonFiniteLossError
from ltstudy.methods.balanced_softmax import balanced_softmax_loss
from ltstudy.methods.feature import FeatureMethod, FeatureSet, minibatches
from ltstudy.methods.registry import Params, Recipe, register
from ltstudy.runtime import optimizer_step

LOG_2PI = math.log(2 * math.pi)


class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder D → H → … → 2D giving (m, log a); u = (x − m)·exp(−log a)."""

    def __init__(self, dim: int, hidden: int, n_hidden: int, reverse: bool) -> None:
        super().__init__()
        deg_in = torch.arange(1, dim + 1)
        if reverse:
            deg_in = deg_in.flip(0)
        deg_h = torch.arange(hidden) % max(dim - 1, 1) + 1
        layers: list[nn.Module] = [MaskedLinear(dim, hidden, (deg_h[:, None] >= deg_in[None]))]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), MaskedLinear(hidden, hidden, (deg_h[:, None] >= deg_h[None]))]
        out_mask = (deg_in[:, None] > deg_h[None]).repeat(2, 1)
        layers += [nn.ReLU(), MaskedLinear(hidden, 2 * dim, out_mask)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, loga = self.net(x).chunk(2, dim=1)
        return (x - m) * torch.exp(-loga), -loga.sum(1)


class FlowBatchNorm(nn.Module):
    """RealNVP batch norm: y = (x − μ)/√(σ² + ε)·exp(log γ) + β; running stats with momentum 0.9."""

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and len(x) > 1:
            mean, var = x.mean(0), x.var(0, unbiased=True)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_(mean.detach() * (1 - self.momentum))
                self.running_var.mul_(self.momentum).add_(var.detach() * (1 - self.momentum))
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean) / torch.sqrt(var + self.eps) * torch.exp(self.log_gamma) + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return y, logdet.expand(len(x))


class FlowGMM(nn.Module):
    """MAF flow with a latent Gaussian mixture (identity covariances, uniform weights, fixed means)."""

    def __init__(self, dim: int, num_cluster: int, n_blocks: int = 2, n_hidden: int = 1,
                 batch_norm: bool = True, center_std: float = 0.05) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_blocks):
            layers.append(MADE(dim, dim, n_hidden, reverse=bool(i % 2)))
            if batch_norm:
                layers.append(FlowBatchNorm(dim))
        self.layers = nn.ModuleList(layers)
        self.register_buffer("means", torch.randn(num_cluster, dim) * center_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent u and log|det ∂u/∂x|."""
        logdet = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def cluster_logits(self, x: torch.Tensor) -> torch.Tensor:
        """log p_k(x) = −D/2 log 2π − ½‖u − μ_k‖² + log|det J|, shape (N, K)."""
        u, logdet = self(x)
        d = u.shape[1]
        sq = torch.cdist(u, self.means).pow(2)
        return -0.5 * d * LOG_2PI - 0.5 * sq + logdet[:, None]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.cluster_logits(x), 1) - math.log(len(self.means))


class ClusterAidedClassifier(nn.Module):
    """CAC ("XZP"): Lin_x(x) + Lin_zp([x, P]); the regular classifier ("XZ") is Lin_x(x) + Lin_z(x)."""

    def __init__(self, dim: int, num_classes: int, with_prior: bool) -> None:
        super().__init__()
        self.with_prior = with_prior
        self.lin_x = nn.Linear(dim, num_classes)
        self.lin_z = nn.Linear(dim + (num_classes if with_prior else 0), num_classes)

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.cat([x, prior], 1) if self.with_prior else x
        return self.lin_x(x) + self.lin_z(z)


class DLSAParams(Params):
    num_cluster: int = Field(500, ge=1, description="GMM components K (capped at the samples clustered)")
    gmm_center_std: float = Field(0.05, gt=0.0, description="std of the fixed random component means")
    n_blocks: int = Field(2, ge=1, description="MADE + BatchNorm flow blocks")
    n_hidden: int = Field(1, ge=0, description="extra hidden layers of each MADE")
    flow_lr: float = Field(0.2, gt=0.0, description="SGD lr of the flow (momentum 0, constant)")
    flow_epochs: int = Field(50, ge=1, description="flow training epochs per depth")
    flow_batch_size: int = Field(1024, ge=2, description="flow batch size")
    weight_q: float = Field(2.0, ge=0.0, description="likelihood weight w_c ∝ (n_max/n_c)^q")
    lambda_lh: float = Field(2.0, ge=0.0, description="likelihood loss weight")
    lambda_balance: float = Field(1.0, ge=0.0, description="cluster-usage balance (KL to uniform) weight")
    lambda_purity: float = Field(0.02, ge=0.0, description="negative-pair purity (soft CE) weight")
    posterior_momentum: float = Field(0.7, ge=0.0, lt=1.0, description="EMA momentum of the cluster marginal")
    contrast_freeze: bool = Field(True, description="detach the positive posterior in the purity loss")
    llh_proportion: float = Field(0.3, gt=0.0, lt=1.0, description="share routed to the CAC at each depth")
    max_depth: int = Field(1, ge=1, description="flow / CAC levels before the regular classifier")
    min_purity: float = Field(0.7, ge=0.0, le=1.0, description="flow selection: cluster purity threshold")
    min_size: int = Field(10, ge=0, description="flow selection: minimum cluster size")
    classifier_loss: Literal["bsm", "ce"] = Field("bsm", description="Balanced Softmax or plain CE")


_RECIPE = {"epochs": 150, "lr": 1e-2, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 128,
           "optimizer": "sgd", "schedule": "constant", "warmup_epochs": 0, "max_depth": 1, "num_cluster": 500,
           "flow_lr": 0.2, "flow_epochs": 50, "flow_batch_size": 1024, "weight_q": 2.0, "lambda_lh": 2.0,
           "lambda_balance": 1.0, "lambda_purity": 0.02, "posterior_momentum": 0.7, "llh_proportion": 0.3,
           "classifier_loss": "bsm"}
_SOURCE = ("max_depth 1, 500 clusters, flow SGD lr 0.2 for 50 epochs (batch 1024), weight_q 2, lambda_lh 2, "
           "lambda_balance 1, lambda_purity 0.02, posterior momentum 0.7, llh_proportion 0.3; Balanced-Softmax "
           "classifiers, SGD lr 0.01 momentum 0, batch 128, 150 epochs")


@register
class DLSA(FeatureMethod):
    name = "dlsa"
    summary = "DLSA: FlowGMM likelihood routing to cluster-aided Balanced-Softmax classifiers"
    Params = DLSAParams
    recipes = {
        "cifar10": Recipe(_RECIPE, "no CIFAR config in silicx/DLSA; its ImageNet-LT CE-feature one: " + _SOURCE),
        "cifar100": Recipe(_RECIPE, "no CIFAR config in silicx/DLSA; its ImageNet-LT CE-feature one: " + _SOURCE),
        "imagenet": Recipe(_RECIPE, "silicx/DLSA config/ImgNet_CE_R50_bsm.yaml: " + _SOURCE),
    }

    # -- flow ------------------------------------------------------------------------------------
    def flow_losses(self, flow: FlowGMM, xp: torch.Tensor, xn: torch.Tensor, wp: torch.Tensor,
                    state: dict[str, Any]) -> torch.Tensor:
        p = self.p
        lp = flow.cluster_logits(xp)
        ln = flow.cluster_logits(xn)
        k = lp.shape[1]
        llh = torch.logsumexp(lp, 1) - math.log(k)
        loss_lh = -p.lambda_lh * (wp * llh).mean()
        post_p = torch.softmax(lp.detach() if p.contrast_freeze else lp, 1)
        loss_pur = p.lambda_purity * (post_p * torch.log_softmax(ln, 1)).sum(1).mean()
        pbar = torch.softmax(lp, 1).mean(0) + 1e-7
        state["t"] += 1
        ema = p.posterior_momentum * state["ema"] + (1 - p.posterior_momentum) * pbar
        state["ema"] = ema.detach()
        marginal = ema / (1 - p.posterior_momentum ** state["t"])
        loss_bal = p.lambda_balance * ((marginal * torch.log(marginal)).sum() + math.log(k))
        return loss_lh + loss_pur + loss_bal

    def train_flow(self, x: torch.Tensor, y: torch.Tensor) -> FlowGMM:
        dev, c, p = x.device, self.feats.num_classes, self.p
        k = min(p.num_cluster, len(x))
        flow = FlowGMM(x.shape[1], k, n_blocks=p.n_blocks, n_hidden=p.n_hidden,
                       center_std=p.gmm_center_std).to(dev)
        opt = torch.optim.SGD(flow.parameters(), lr=p.flow_lr, momentum=0.0)
        counts = torch.bincount(y, minlength=c)
        classes = (counts > 0).nonzero().flatten()
        n = counts[classes]
        w = (n.max() / n.double()).pow(p.weight_q)
        w = (w / w.sum()).float()
        order = torch.argsort(y, stable=True)
        starts = (torch.cumsum(counts, 0) - counts)[classes]
        state = {"t": 0, "ema": torch.zeros(k, device=dev)}
        bs = min(p.flow_batch_size, len(x))
        best, best_score = None, None
        for epoch in range(p.flow_epochs):
            flow.train()
            total = torch.zeros((), device=dev)
            for _step in range(max(len(x) // bs, 1)):
                pos = torch.randint(len(classes), (bs,), device=dev)
                neg = (pos + torch.randint(1, max(len(classes), 2), (bs,), device=dev)) % len(classes)
                pick = lambda cl: order[starts[cl] + (torch.rand(bs, device=dev) * n[cl]).long()]  # noqa: E731
                total += optimizer_step(opt, self.flow_losses(flow, x[pick(pos)], x[pick(neg)], w[pos], state))
            if not bool(torch.isfinite(total)):
                raise NonFiniteLossError(f"DLSA's flow diverged: its loss is {total.item()} in flow epoch "
                                         f"{epoch + 1} (flow_lr {p.flow_lr}); lower flow_lr")
            score = self._cluster_score(flow, x, y, k)
            if best_score is None or score > best_score:
                best_score = score
                best = {kk: v.detach().clone() for kk, v in flow.state_dict().items()}
        flow.load_state_dict(best)
        return flow.eval()

    @torch.no_grad()
    def _cluster_score(self, flow: FlowGMM, x: torch.Tensor, y: torch.Tensor, k: int) -> tuple:
        flow.eval()
        assign = flow.cluster_logits(x).argmax(1)
        hist = torch.zeros(k, self.feats.num_classes, device=x.device).index_put_(
            (assign, y), torch.ones(len(y), device=x.device), accumulate=True)
        size = hist.sum(1)
        purity = hist.max(1).values / size.clamp_min(1)
        good = int(((purity > self.p.min_purity) & (size > self.p.min_size)).sum())
        return (bool(size.max() < 5000), good)

    # -- routing and classifiers -----------------------------------------------------------------
    def prepare(self, feats: FeatureSet) -> None:
        super().prepare(feats)
        dev, c = feats.train_x.device, feats.num_classes
        xs = {"train": feats.train_x, "val": feats.val_x, "test": feats.test_x}
        owner = {s: torch.full((len(v),), self.p.max_depth, dtype=torch.long, device=dev) for s, v in xs.items()}
        priors = {s: torch.zeros(len(v), c, device=dev) for s, v in xs.items()}
        self.flows: list[FlowGMM] = []
        for depth in range(self.p.max_depth):
            remaining = owner["train"] == self.p.max_depth
            if int(remaining.sum()) < 2:
                break
            flow = self.train_flow(feats.train_x[remaining], feats.train_y[remaining])
            self.flows.append(flow)
            with torch.no_grad():
                llh = {s: flow.log_prob(v) for s, v in xs.items()}
            for split, value in llh.items():
                if not bool(torch.isfinite(value).all()):
                    raise NonFiniteLossError(f"DLSA's flow at depth {depth + 1} gives a non-finite "
                                             f"log-likelihood on {split} samples; lower flow_lr "
                                             f"({self.p.flow_lr})")
            with torch.no_grad():
                assign_all = flow.cluster_logits(feats.train_x).argmax(1)
                k = len(flow.means)
                hist = torch.zeros(k, c, device=dev).index_put_(
                    (assign_all, feats.train_y), torch.ones(len(feats.train_y), device=dev), accumulate=True)
                hist = hist / hist.sum(1, keepdim=True).clamp_min(1)
                tau = torch.quantile(llh["train"][remaining], 1 - self.p.llh_proportion)
                for s, v in xs.items():
                    route = (owner[s] == self.p.max_depth) & (llh[s] >= tau)
                    owner[s][route] = depth
                    priors[s][route] = hist[flow.cluster_logits(v[route]).argmax(1)] if route.any() \
                        else priors[s][route]
        self.owner, self.priors = owner, priors
        self.stages = nn.ModuleList(
            [ClusterAidedClassifier(feats.feature_dim, c, with_prior=True) for _ in self.flows]
            + [ClusterAidedClassifier(feats.feature_dim, c, with_prior=False)]
        ).to(dev)
        self.stage_ids = list(range(len(self.flows))) + [self.p.max_depth]
        self.counts = []
        for sid in self.stage_ids:
            ys = feats.train_y[owner["train"] == sid]
            self.counts.append(feats.class_counts if sid == self.p.max_depth else torch.bincount(ys, minlength=c))

    def classifier(self) -> nn.Module:
        return self.stages

    def batches(self, epoch: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(stage index, train rows) batches: one pass over each stage's routed samples, stage by stage."""
        for i, sid in enumerate(self.stage_ids):
            rows = (self.owner["train"] == sid).nonzero().flatten()
            for b in minibatches(len(rows), self.ctx.train.batch_size, rows.device):
                yield i, rows[b]

    def batch_loss(self, batch: tuple[int, torch.Tensor]) -> torch.Tensor:
        i, rows = batch
        f = self.feats
        logits = self.stages[i](f.train_x[rows], self.priors["train"][rows])
        if self.p.classifier_loss == "bsm":
            return balanced_softmax_loss(logits, f.train_y[rows], self.counts[i])
        return F.cross_entropy(logits, f.train_y[rows])

    def logits(self, split: str) -> torch.Tensor:
        x = self.feats.val_x if split == "val" else self.feats.test_x
        out = torch.zeros(len(x), self.feats.num_classes, device=x.device)
        for stage, sid in zip(self.stages, self.stage_ids, strict=True):
            rows = (self.owner[split] == sid).nonzero().flatten()
            if len(rows):
                out[rows] = stage(x[rows], self.priors[split][rows])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"owner": self.owner, "priors": self.priors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.owner, self.priors = state["owner"], state["priors"]
