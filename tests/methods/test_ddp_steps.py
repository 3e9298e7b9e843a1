"""FSGL and MetaSAug under data parallelism: one step of ltstudy's own trainer code (``build_method``,
``prepare_model``, the method's loader and ``train_step``) on two processes equals the update one process
computes from the two ranks' shards with the same functions.

What "equal" means: DDP averages the ranks' gradients, so the step is that of the mean of the shard losses.
With plain BatchNorm (the CPU) each rank normalises its own shard, and FSGL's MixUp and CutMix batches
take separate forwards; with SyncBatchNorm (CUDA) the real forward normalises the global batch while
MetaSAug's look-ahead runs each rank's shard through the plain-BN twin. MetaSAug's meta-gradient on the
covariance is averaged over ranks and its estimator sums both ranks' statistics.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltstudy.methods.fsgl import sam_step
from ltstudy.methods.metasaug import metasaug_loss
from ltstudy.runtime import optimizer_step

from support.configs import TINY
from support.ddp import ddp_step, epoch_seed, prime, setup

#: FSGL's SAM takes its second gradient at the perturbed weights, where some ReLU inputs sit at zero: nudging
#: the one-process loss by a relative 1e-7 moves its result by 0.1% of the step (seed 0, rho 0.05), so the
#: rounding of two ranks' all-reduce is allowed 1% of the step; a wrong reduction is off by the step itself
SAM_SLACK = 0.01
BASE = {**TINY, "model": "resnet32", "epochs": 2, "batch_size": 32, "lr": 0.05, "device": "cpu"}
VALUES = {
    "fsgl": {**BASE, "method": "fsgl"},
    # a large meta_lr makes the meta-gradient on Σ move the weights far beyond rounding: without its
    # all-reduce over ranks the weights are off by half the step (checked), with it by 2e-7
    "metasaug": {**BASE, "method": "metasaug", "switch": 0.5, "num_meta": 2, "meta_batch": 8, "meta_lr": 1000.0,
                 "lam": 1.0},
}


def _split_halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = len(y) // 2
    return y[:b], y[b:]


def reference_step(values: dict, world: int, device: torch.device, global_bn: bool) -> dict[str, torch.Tensor]:
    """One process: the same loader batch cut into the ranks' shards, the update done by hand."""
    cfg, method, model, optimizer, loader = setup(values, device)
    batch = next(iter(loader))
    shards = [tuple(t.tensor_split(world)[r] for t in batch) for r in range(world)]
    if cfg.method == "fsgl":
        mixes = []
        for shard in shards:  # every rank draws λ and the box from the same RNG state
            torch.manual_seed(epoch_seed(cfg))
            mixes.append(method.mix(shard))

        def closure() -> torch.Tensor:
            if not global_bn:
                return sum(method.loss_from_outputs(model(xs, phis), y, y_w) for xs, phis, y, y_w in mixes) / world
            xs = [torch.cat([m[0][i] for m in mixes]) for i in (0, 1)]
            phis = [torch.cat([m[1][i] for m in mixes]) for i in (0, 1)]
            y = torch.cat([_split_halves(m[2])[i] for i in (0, 1) for m in mixes])
            y_w = torch.cat([_split_halves(m[3])[i] for i in (0, 1) for m in mixes])
            return method.loss_from_outputs(model(xs, phis), y, y_w)

        if method.p.rho > 0:
            sam_step([p for g in optimizer.param_groups for p in g["params"]], closure, optimizer, method.p.rho)
        else:
            optimizer_step(optimizer, closure())
    else:
        prime(method, int(model.feature_dim), copies=world)
        torch.manual_seed(epoch_seed(cfg))
        est = method.estimator
        x_meta, y_meta = method._meta_batch(model, device)
        lr = optimizer.param_groups[0]["lr"]
        new_cov = torch.stack([method.meta_covariance(model, x, y, est.cov, lr, x_meta, y_meta)
                               for x, y in shards]).mean(0)
        if global_bn:
            z = model(torch.cat([x for x, _ in shards])).tensor_split(world)
        else:
            z = [model(x) for x, _ in shards]
        loss = sum(metasaug_loss(zr, model.head.weight, y, new_cov, method.lam_t, method.margins, method.p.s,
                                 method.cb_weights) for zr, (_, y) in zip(z, shards, strict=True)) / world
        optimizer_step(optimizer, loss)
    return {k: p.detach().cpu() for k, p in model.named_parameters()}


def _initial(values: dict, device: torch.device) -> dict[str, torch.Tensor]:
    _, _, model, _, _ = setup(values, device)
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters()}


def _check(ranks: list[dict], reference: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
           atol: float) -> None:
    step = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    atol = max(atol, SAM_SLACK * step) if ranks[0]["method"] == "fsgl" else atol
    for name, value in reference.items():
        torch.testing.assert_close(ranks[1]["params"][name], ranks[0]["params"][name], atol=0, rtol=0,
                                   msg=f"ranks differ in {name}")
        torch.testing.assert_close(ranks[0]["params"][name], value, atol=atol, rtol=0, msg=name)
    moved = [k for k in reference if not torch.equal(reference[k], initial[k])]
    assert len(moved) > len(reference) // 2, "the step changed the weights"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fsgl", "metasaug"])
def test_two_gloo_ranks_take_the_step_one_process_computes(method, one_thread):
    ranks = ddp_step(VALUES[method], world_size=2, device="cpu", backend="gloo")
    assert not ranks[0]["sync_bn"]
    cpu = torch.device("cpu")
    _check(ranks, reference_step(VALUES[method], 2, cpu, global_bn=False), _initial(VALUES[method], cpu), 2e-5)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA variant of the gloo test above: needs a GPU")
@pytest.mark.parametrize("method", ["fsgl", "metasaug"])
def test_two_cuda_ranks_with_syncbatchnorm_take_the_step_one_process_computes(method):
    """NCCL with one GPU per rank when there are two, else gloo with both ranks on the one GPU."""
    values = {**VALUES[method], "device": "cuda", "amp": False}
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    ranks = ddp_step(values, world_size=2, device="cuda", backend=backend)
    assert ranks[0]["sync_bn"], "the trainer converts BatchNorm to SyncBatchNorm on CUDA"
    cuda = torch.device("cuda", 0)
    _check(ranks, reference_step(values, 2, cuda, global_bn=True), _initial(values, cuda), 2e-4)


def test_the_look_ahead_never_differentiates_through_syncbatchnorm(monkeypatch):
    """SyncBatchNorm's backward has no derivative of its own: the look-ahead runs on a plain-BN twin that is
    fed the real network's parameters, and gives what the plain network gives."""
    cpu = torch.device("cpu")
    values = VALUES["metasaug"]
    _, method, model, optimizer, loader = setup(values, cpu)
    x, y = next(iter(loader))
    prime(method, int(model.feature_dim))
    x_meta, y_meta = method._meta_batch(model, cpu)
    plain = method.meta_covariance(method.lookahead_module(model), x, y, method.estimator.cov, 0.05, x_meta, y_meta)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, SyncBatchNorm layers
    calls = []
    real_forward = nn.SyncBatchNorm.forward
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", lambda self, inp: calls.append(1) or real_forward(self, inp))
    twin = method.lookahead_module(synced)
    assert twin is not synced and not any(isinstance(m, nn.SyncBatchNorm) for m in twin.modules())
    assert {k for k, _ in twin.named_parameters()} == {k for k, _ in synced.named_parameters()}
    via_twin = method.meta_covariance(twin, x, y, method.estimator.cov, 0.05, x_meta, y_meta)
    assert calls == [], "no SyncBatchNorm layer ran in the look-ahead"
    torch.testing.assert_close(via_twin, plain, atol=1e-6, rtol=0)
    assert method.lookahead_module(synced) is twin, "built once"
