"""Parity of each baseline loss with a hand-computed case."""

import math

import torch
import torch.nn.functional as F

from ltstudy.methods.balanced_softmax import balanced_softmax_loss
from ltstudy.methods.ldam_drw import class_balanced_weights, ldam_loss, ldam_margins


def test_ldam_with_zero_margin_and_unit_scale_is_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    margins = ldam_margins(torch.tensor([100, 50, 20, 10, 5]), max_m=0.0)
    assert torch.allclose(ldam_loss(logits, y, margins, s=1.0), F.cross_entropy(logits, y))


def test_ldam_margin_hand_computed():
    counts = torch.tensor([16, 1])
    m = ldam_margins(counts, max_m=0.5)
    assert torch.allclose(m, torch.tensor([0.25, 0.5]))  # 16^-1/4 = 0.5 -> scaled by 0.5/1
    logits, y = torch.tensor([[0.2, 0.1]]), torch.tensor([1])
    z = 2.0 * torch.tensor([0.2, 0.1 - 0.5])
    expected = -z[1] + torch.logsumexp(z, 0)
    assert torch.allclose(ldam_loss(logits, y, m, s=2.0), expected)


def test_drw_weights_equal_class_balanced_formula():
    counts, beta = torch.tensor([1000, 100, 10]), 0.999
    w = [(1 - beta) / (1 - beta**n) for n in (1000, 100, 10)]
    expected = torch.tensor([x / sum(w) * 3 for x in w])
    assert torch.allclose(class_balanced_weights(counts, beta), expected, rtol=1e-6)
    assert math.isclose(class_balanced_weights(counts, beta).sum().item(), 3.0, rel_tol=1e-6)


def test_balanced_softmax_equals_ce_for_equal_counts():
    torch.manual_seed(0)
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    loss = balanced_softmax_loss(logits, y, torch.full((4,), 37))
    assert torch.allclose(loss, F.cross_entropy(logits, y))


def test_balanced_softmax_hand_computed():
    logits, y = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    loss = balanced_softmax_loss(logits, y, torch.tensor([3, 1]))
    assert math.isclose(loss.item(), math.log(4.0), rel_tol=1e-6)  # -log(1 / (3 + 1))
