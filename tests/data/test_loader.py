from __future__ import annotations

import pytest
import torch

from ltstudy.data import AugmentSpec, build_data, epoch_order, make_loader, sample_weights
from ltstudy.errors import ConfigError


@pytest.fixture(scope="module")
def synth():
    return build_data("synthetic", imbalance=10, val_per_class=10, seed=0)


def test_synthetic_follows_profile(synth):
    from ltstudy.data import lt_counts

    assert synth.class_counts.tolist() == lt_counts(200, 10, 10)
    assert torch.bincount(synth.val.labels).tolist() == [10] * 10
    assert synth.train.images.shape[1:] == (3, 32, 32) and synth.train.images.dtype == torch.uint8
    assert set(synth.train.indices.tolist()).isdisjoint(synth.val.indices.tolist())


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_same_seed_epoch_same_batches(synth):
    spec = AugmentSpec(cutout=8, autoaugment=True)
    a = make_loader(synth, "train", batch_size=64, device="cpu", train=True, augment=spec, seed=3)
    b = make_loader(synth, "train", batch_size=64, device="cpu", train=True, augment=spec, seed=3)
    e1, e1b, e2 = _epoch(a, 1), _epoch(b, 1), _epoch(a, 2)
    assert len(e1) == len(a) == -(-a.num_samples // 64)
    assert all(torch.equal(x, xb) and torch.equal(y, yb) for (x, y), (xb, yb) in zip(e1, e1b, strict=True))
    assert not torch.equal(e1[0][1], e2[0][1])
    assert torch.equal(_epoch(a, 1)[0][0], e1[0][0])  # resuming at epoch 1 needs no state


def test_two_ranks_concatenate_to_global_batch(synth):
    kw = dict(batch_size=32, device="cpu", train=True, augment=AugmentSpec(cutout=4), sampler="sqrt", seed=5)
    single = _epoch(make_loader(synth, "train", **kw), 0)
    ranks = [_epoch(make_loader(synth, "train", rank=r, world_size=2, **kw), 0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        assert len(y0) == len(y1) == len(y) // 2
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_eval_loader_in_order_and_channels_last(synth):
    loader = make_loader(synth, "test", batch_size=64, device="cpu", train=False, channels_last=True)
    batches = list(loader)
    assert torch.equal(torch.cat([y for _, y in batches]), synth.test.labels)
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_bad_world_size(synth):
    with pytest.raises(ConfigError):
        make_loader(synth, "train", batch_size=30, device="cpu", train=True, world_size=4)


def test_class_balanced_draws_tail_like_head(synth):
    weights = sample_weights(synth.train.labels, synth.class_counts, "class_balanced")
    order = epoch_order(20000, weights, torch.Generator().manual_seed(0))
    freq = torch.bincount(synth.train.labels[order], minlength=10).float() / 20000
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.02)
    assert sample_weights(synth.train.labels, synth.class_counts, "instance") is None
    sq = sample_weights(synth.train.labels, synth.class_counts, "sqrt")
    assert torch.allclose(sq, sample_weights(synth.train.labels, synth.class_counts, "power", 0.5))
    with pytest.raises(ConfigError):
        sample_weights(synth.train.labels, synth.class_counts, "focal")


def test_distributed_eval_keeps_every_sample(synth):
    # 100 val samples, global batch 33 on 3 ranks: the last global batch holds a single sample
    ranks = [
        list(make_loader(synth, "val", batch_size=33, device="cpu", train=False, rank=r, world_size=3))
        for r in range(3)
    ]
    assert all(len(r) == 4 for r in ranks)
    labels = torch.cat([torch.cat([ranks[r][b][1] for r in range(3)]) for b in range(4)])
    assert torch.equal(labels, synth.val.labels)
