"""Two Ray Train CPU workers (gloo DDP) reach the same weights as one process with the same global batch.

Scope and tolerance: ResNet-32's BatchNorm normalises with per-rank batch statistics, and the trainer
uses SyncBatchNorm only on CUDA, so a ResNet run on 2 CPU ranks legitimately differs from 1 rank. This
test therefore checks the DDP mechanics ltstudy relies on (TorchTrainer + gloo, each rank taking its
half of every global batch, gradient averaging) on a BN-free model: the weights after 20 SGD steps must
agree to atol 1e-5 (float32 all-reduce summation order is the only difference).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

GLOBAL_BATCH, STEPS = 32, 20


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_BATCH * STEPS, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4] > 1).long()
    return x, y


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def _train(model, rank: int, world: int):
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        xb = x[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        yb = y[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = torch.nn.functional.cross_entropy(model(xb[shard]), yb[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _worker(_config):
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    model = ray.train.torch.prepare_model(_model())
    _train(model, ctx.get_world_rank(), ctx.get_world_size())
    inner = model.module if hasattr(model, "module") else model
    # Train V2 keeps metrics only with a checkpoint: rank 0 saves its weights, every rank reports
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if ctx.get_world_rank() == 0:
            torch.save([p.detach().flatten() for p in inner.parameters()], f"{tmp}/weights.pt")
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"done": 1}, checkpoint=ckpt)


def test_two_cpu_workers_match_one(ray_local, tmp_path):
    import sys

    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchConfig, TorchTrainer

    # the test module is not importable on Ray workers: ship its functions by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    single = [p.detach().flatten() for p in _train(_model(), 0, 1).parameters()]
    trainer = TorchTrainer(_worker, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path), name="ddp"))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        ddp = torch.load(f"{d}/weights.pt")
    for a, b in zip(single, ddp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
