"""MetaSAug: ISDA loss, covariance estimator, meta step, meta set carved as data, one epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltstudy.config import resolve_config
from ltstudy.data import make_synthetic
from ltstudy.errors import ConfigError
from ltstudy.methods import MethodContext
from ltstudy.methods.metasaug import (
    CovarianceEstimator,
    MetaSAug,
    MetaSAugNet,
    MetaSAugParams,
    isda_quadratic,
    lookahead_meta_loss,
    meta_step_covariance,
    metasaug_loss,
)
from ltstudy.train import run_trial


def test_isda_loss_equals_ce_when_covariance_is_zero():
    z, y, w = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1]), torch.randn(4, 5)
    for cov in (torch.zeros(4, 5, 5), torch.zeros(4, 5)):
        assert torch.allclose(metasaug_loss(z, w, y, cov, 0.7), F.cross_entropy(z, y))
    cw = torch.tensor([0.5, 1.0, 1.5, 1.0])
    assert torch.allclose(metasaug_loss(z, w, y, torch.zeros(4, 5, 5), 0.7, class_weight=cw),
                          F.cross_entropy(z, y, weight=cw))


def test_isda_ldam_two_class_hand_value():
    w = torch.eye(2)  # w_0 = (1,0), w_1 = (0,1)
    cov = torch.stack([torch.diag(torch.tensor([1.0, 2.0])), torch.eye(2)])
    z, y = torch.tensor([[2.0, 1.0]]), torch.tensor([0])
    # (w_1 - w_0)^T Σ_0 (w_1 - w_0) = 1 + 2 = 3 → ẑ_1 = 1 + ½·0.5·3 = 1.75; ẑ_0 = 2 - m_0 = 1.8
    loss = metasaug_loss(z, w, y, cov, 0.5, margins=torch.tensor([0.2, 0.5]))
    expected = -math.log(math.exp(1.8) / (math.exp(1.8) + math.exp(1.75)))
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    # s scales the whole augmented logit vector
    loss_s = metasaug_loss(z, w, y, cov, 0.5, margins=torch.tensor([0.2, 0.5]), s=10.0)
    assert math.isclose(float(loss_s), math.log(1 + math.exp(10 * (1.75 - 1.8))), rel_tol=1e-6)
    # the diagonal form gives the same value for a diagonal Σ
    diag = torch.stack([torch.diagonal(c) for c in cov])
    assert torch.allclose(isda_quadratic(w, diag, torch.tensor([0, 1])),
                          isda_quadratic(w, cov, torch.tensor([0, 1])))


def test_estimator_from_zero_equals_batch_statistics_and_merges_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)  # class 3 absent
    for full in (True, False):
        est = CovarianceEstimator(4, 3, full=full, dtype=torch.float64)
        est.update(x[:25], y[:25])
        est.update(x[25:], y[25:])
        for c in range(3):
            xc = x[y == c]
            mu = xc.mean(0)
            cov = (xc - mu).T @ (xc - mu) / len(xc)
            assert torch.allclose(est.mean[c], mu)
            assert torch.allclose(est.cov[c], cov if full else torch.diagonal(cov))
            assert int(est.count[c]) == len(xc)
        assert est.count[3] == 0 and est.mean[3].abs().sum() == 0 and est.cov[3].abs().sum() == 0
    one = CovarianceEstimator(4, 3, dtype=torch.float64)
    one.update(x, y)
    c0 = x[y == 0]
    assert torch.allclose(one.cov[0], torch.cov(c0.T, correction=0))


class _Tiny(nn.Module):
    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def test_one_meta_step_lowers_the_meta_loss():
    torch.manual_seed(0)
    net = MetaSAugNet(_Tiny(), nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    x_meta, y_meta = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    cov = torch.stack([torch.eye(3) * 0.5, torch.eye(3) * 0.1])
    kw = dict(inner_lr=0.5, x_meta=x_meta, y_meta=y_meta, lam=0.75)

    def meta_loss(c):
        return float(lookahead_meta_loss(net, x, y, c, margins=None, s=1.0, class_weight=None, **kw).detach())

    new_cov = meta_step_covariance(net, x, y, cov, meta_lr=0.1, **kw)
    assert not torch.equal(new_cov, cov)
    assert meta_loss(new_cov) < meta_loss(cov)
    assert all(p.grad is None for p in net.parameters())  # the look-ahead leaves no gradient behind


def test_lookahead_does_not_touch_bn_running_stats():
    from ltstudy.models import build_backbone
    from ltstudy.models.heads import LinearHead

    torch.manual_seed(0)
    bb = build_backbone("resnet32")
    net = MetaSAugNet(bb, LinearHead(bb.feature_dim, 3))
    before = {k: b.clone() for k, b in net.named_buffers()}
    x = torch.randn(4, 3, 16, 16)
    meta_step_covariance(net, x, torch.tensor([0, 1, 2, 0]), torch.zeros(3, 64, 64), 0.1,
                         x, torch.tensor([0, 1, 2, 1]), 0.1, 0.5)
    assert all(torch.equal(before[k], b) for k, b in net.named_buffers())


def _ctx(data, **train):
    cfg = resolve_config({"method": "metasaug", "dataset": "synthetic", "model": "resnet32", **train})
    return MethodContext(num_classes=data.num_classes, class_counts=data.class_counts, epochs=10,
                         device=torch.device("cpu"), model_name="resnet32", train=cfg.train, data=data)


def _data(num_meta=7):
    return make_synthetic(num_classes=5, n_max=20, imbalance=5, val_per_class=4, test_per_class=2,
                          carved=MetaSAug.carved_sets(MetaSAugParams(num_meta=num_meta)))


def test_meta_set_is_carved_data_apart_from_train_and_val():
    data = _data(num_meta=7)
    m = MetaSAug(MetaSAugParams(num_meta=7), _ctx(data))
    assert m.meta is data.carved["meta"]
    assert torch.bincount(m.meta.labels, minlength=5).tolist() == [7] * 5
    assert torch.bincount(data.val.labels, minlength=5).tolist() == [4] * 5  # val keeps val_per_class
    assert data.class_counts[0] == 20  # the head keeps n_max
    meta = set(m.meta.indices.tolist())
    assert not meta & set(data.val.indices.tolist()) and not meta & set(data.train.indices.tolist())
    with pytest.raises(ConfigError, match="meta set"):
        MetaSAug(MetaSAugParams(), _ctx(make_synthetic(num_classes=5, n_max=20, imbalance=5)))


def test_the_trainer_never_validates_on_a_meta_image(monkeypatch):
    import ltstudy.train.image as image

    built = []
    real = image.make_loader

    def spy(data, split, **kw):
        built.append((split, getattr(data, split).indices.clone(), data.carved["meta"].indices.clone()))
        return real(data, split, **kw)

    monkeypatch.setattr(image, "make_loader", spy)
    cfg = resolve_config({"method": "metasaug", "dataset": "synthetic", "image_size": 8, "epochs": 1,
                          "batch_size": 32, "device": "cpu", "model": "resnet32", "num_meta": 3,
                          "meta_batch": 8, "val_per_class": 5, "synthetic_classes": 4})
    run_trial(cfg)
    val = [(idx, meta) for split, idx, meta in built if split == "val"]
    assert val and len(val[0][0]) == 4 * 5
    for idx, meta in val:
        assert len(meta) == 4 * 3 and not set(idx.tolist()) & set(meta.tolist())


def test_state_dict_carries_the_estimator():
    m = MetaSAug(MetaSAugParams(), _ctx(_data(num_meta=10)))
    est = m.covariance_estimator(4)
    est.update(torch.randn(10, 4), torch.randint(0, 5, (10,)))
    state = m.state_dict()
    m2 = MetaSAug(MetaSAugParams(), _ctx(_data(num_meta=10)))
    m2.load_state_dict(state)
    for k in ("count", "mean", "cov"):
        assert torch.equal(getattr(m2.estimator, k), getattr(est, k))


def test_the_classifier_only_recipe_trains_the_stage1_classifier_on_a_frozen_backbone(tmp_path):
    """The reference's ImageNet recipe: the stage-1 network's backbone stays as it was (weights and BN
    statistics), only the classifier moves; the stage-1 network must come from the same data."""
    from ltstudy.train import TrialContext, load_checkpoint

    from support.configs import tiny_config, train_backbone

    stage1 = train_backbone(str(tmp_path / "s1"))
    cfg = tiny_config("metasaug", train_scope="classifier", switch=0.0, num_meta=2, meta_batch=8,
                      covariance="diag").replace(backbone=stage1)
    metrics = run_trial(cfg, ctx=TrialContext(checkpoint_dir=str(tmp_path / "ms")))
    assert math.isfinite(metrics["test_loss"])
    before = load_checkpoint(stage1, torch.device("cpu"))["model"]
    after = load_checkpoint(tmp_path / "ms", torch.device("cpu"))["model"]
    for key, value in before.items():
        if key.startswith("backbone."):
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["head.weight"], before["head.weight"])
    with pytest.raises(ConfigError, match="imbalance=10.0 differs from the stage-1 network's imbalance=20"):
        run_trial(cfg.replace(imbalance=10))
    with pytest.raises(ConfigError, match="set backbone=CHECKPOINT"):
        run_trial(cfg.replace(backbone=None))
