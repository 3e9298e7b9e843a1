"""Classifier heads: NormedHead, CosineHead and the backbone x head product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltstudy.models import Classifier, CosineHead, LinearHead, NormedHead, build_model, list_heads

CHEAP = ["resnet32", "resnet32_w4", "resnet34_cifar"]


@pytest.mark.parametrize("head", list_heads())
@pytest.mark.parametrize("name", CHEAP)
def test_classifier_shapes_and_finite_gradients(name, head):
    torch.manual_seed(0)
    model = build_model(name, num_classes=6, head=head)
    assert isinstance(model, Classifier)
    x = torch.randn(3, 3, 32, 32)
    f = model.features(x)
    assert f.shape == (3, model.feature_dim)
    logits = model(x)
    assert logits.shape == (3, 6)
    torch.testing.assert_close(model.logits_from_features(f), logits)
    F.cross_entropy(logits, torch.tensor([0, 3, 5])).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


def test_linear_head_is_affine():
    head = LinearHead(8, 3)
    x = torch.randn(5, 8)
    torch.testing.assert_close(head(x), x @ head.weight.t() + head.bias)


def test_normed_head_is_cosine_similarity():
    torch.manual_seed(0)
    head = NormedHead(16, 5)
    assert head.weight.shape == (16, 5)
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(5))
    x = torch.randn(7, 16) * 3
    out = head(x)
    assert out.min() >= -1 and out.max() <= 1
    by_hand = torch.empty(7, 5)
    for i in range(7):
        for c in range(5):
            w = head.weight[:, c]
            by_hand[i, c] = torch.dot(x[i], w) / (x[i].norm() * w.norm())
    torch.testing.assert_close(out, by_hand)
    assert not any(n.endswith("bias") for n, _ in head.named_parameters())


def test_normed_head_init_is_a_column_rescaled_uniform():
    torch.manual_seed(0)
    draw = torch.empty(16, 5).uniform_(-1, 1)
    torch.manual_seed(0)
    head = NormedHead(16, 5)
    torch.testing.assert_close(head.weight, draw / draw.norm(dim=0, keepdim=True))


def test_cosine_head_scale_and_formula():
    torch.manual_seed(0)
    head = CosineHead(12, 4)
    assert head.s.item() == 10.0
    torch.testing.assert_close(head.scale, F.softplus(torch.tensor(10.0)))
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(6, 12)
    cos = torch.stack([F.cosine_similarity(x, head.weight[c].expand_as(x), dim=1) for c in range(4)], dim=1)
    torch.testing.assert_close(head(x), F.softplus(head.s) * cos + head.bias)


def test_cosine_head_normalises_each_class_vector():
    torch.manual_seed(0)
    head = CosineHead(12, 4)
    x = torch.randn(6, 12)
    before = head(x)
    with torch.no_grad():
        head.weight[2].mul_(7.0)  # rescaling one class vector must not change any logit
    torch.testing.assert_close(head(x), before)


def test_cosine_head_scale_is_learned():
    head = CosineHead(12, 4)
    F.cross_entropy(head(torch.randn(6, 12)), torch.tensor([0, 1, 2, 3, 0, 1])).backward()
    assert head.s.grad is not None and head.s.grad != 0
