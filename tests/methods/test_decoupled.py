"""Parity of the decoupled baselines and of logit adjustment against hand-computed cases: τ-normalisation,
the logit-adjusted loss and its post-hoc form, τ chosen on validation, LWS at initialisation, cRT's head."""

from __future__ import annotations

import math

import pytest
import torch

from ltstudy.config import resolve_config
from ltstudy.errors import ConfigError
from ltstudy.methods import FeatureSet, MethodContext, get_method
from ltstudy.methods.decoupled import tau_normalized
from ltstudy.methods.logit_adjust import log_prior, logit_adjusted_loss, posthoc_adjust
from ltstudy.models import LinearHead


def _feats(weight, bias, train_y, val_x, val_y, head_type="linear") -> FeatureSet:
    head = LinearHead(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    n = len(train_y)
    counts = torch.bincount(train_y, minlength=weight.shape[0])
    return FeatureSet(train_x=torch.randn(n, weight.shape[1]), train_y=train_y, val_x=val_x, val_y=val_y,
                      test_x=val_x, test_y=val_y, num_classes=weight.shape[0], class_counts=counts,
                      head=head.requires_grad_(False), head_type=head_type)


def _method(name: str, feats: FeatureSet, **params):
    cfg = resolve_config({"method": name, "dataset": "synthetic", **params})
    ctx = MethodContext(num_classes=feats.num_classes, class_counts=feats.class_counts, epochs=1,
                        device=torch.device("cpu"), model_name="-", train=cfg.train)
    m = get_method(name)(cfg.params, ctx)
    m.prepare(feats)
    return m


W = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # class norms 5 and 1
B = torch.tensor([10.0, -10.0])  # τ-norm drops the bias; LWS and post-hoc LA keep it


def test_tau_normalised_weights_by_hand():
    torch.testing.assert_close(tau_normalized(W, 1.0), torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    torch.testing.assert_close(tau_normalized(W, 0.0), W)
    torch.testing.assert_close(tau_normalized(W, 0.5), torch.tensor([[3 / math.sqrt(5), 4 / math.sqrt(5)],
                                                                      [1.0, 0.0]]))


def test_tau_norm_logits_by_hand_and_without_the_bias():
    """x = (1, 1): tau 1 -> (0.6 + 0.8, 1) = (1.4, 1.0); tau 0.5 -> (7 / sqrt 5, 1) = (3.1305, 1.0)."""
    x = torch.tensor([[1.0, 1.0]])
    feats = _feats(W, B, torch.tensor([0, 0, 1]), x, torch.tensor([0]))
    m = _method("tau_norm", feats, select="fixed", tau=1.0)
    torch.testing.assert_close(m.logits("val"), torch.tensor([[1.4, 1.0]]))
    m = _method("tau_norm", feats, select="fixed", tau=0.5)
    torch.testing.assert_close(m.logits("val"), torch.tensor([[7 / math.sqrt(5), 1.0]]))


def test_tau_norm_chooses_tau_on_validation():
    """Validation sample x = (0.1, 1) of class 1. The class-0 logit at tau is (0.3 + 4) / 5^tau = 4.3 / 5^tau,
    the class-1 logit 0.1: right once 4.3 / 5^tau < 0.1, i.e. tau > log 43 / log 5 = 2.337."""
    x = torch.tensor([[0.1, 1.0]])
    feats = _feats(W, B, torch.tensor([0, 0, 1]), x, torch.tensor([1]))
    m = _method("tau_norm", feats)  # never right on the grid 0..2: the smallest tau (0) wins the tie
    assert m.tau == 0.0
    # a grid reaching 2.5 holds 2.4 > 2.337 as its first right answer
    m = _method("tau_norm", feats, tau_max=2.5)
    assert m.tau == pytest.approx(2.4)
    assert m.logits("val").argmax(1).item() == 1


def test_tau_norm_needs_a_linear_classifier():
    feats = _feats(W, B, torch.tensor([0, 1]), torch.ones(1, 2), torch.tensor([0]), head_type="cosine")
    with pytest.raises(ConfigError, match="linear"):
        _method("tau_norm", feats)
    feats.head = None
    with pytest.raises(ConfigError, match="holds none"):
        _method("logit_adjust_posthoc", feats)


def test_logit_adjusted_loss_by_hand():
    """counts (3, 1): pi = (0.75, 0.25). Zero logits, label 1: adjusted logits (log .75, log .25), so the loss
    is -log(0.25 / (0.75 + 0.25)) = log 4. tau 0.5: pi^0.5 = (0.8660, 0.5): -log(0.5 / 1.3660)."""
    counts = torch.tensor([3, 1])
    logits, y = torch.zeros(1, 2), torch.tensor([1])
    assert logit_adjusted_loss(logits, y, counts).item() == pytest.approx(math.log(4), abs=1e-6)
    assert logit_adjusted_loss(logits, y, counts, 0.5).item() == pytest.approx(
        -math.log(0.5 / (math.sqrt(0.75) + 0.5)), abs=1e-6)
    assert logit_adjusted_loss(logits, y, counts, 0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    torch.testing.assert_close(log_prior(counts), torch.log(torch.tensor([0.75, 0.25]) + 1e-12))


def test_posthoc_adjustment_by_hand_and_through_the_method():
    """logits - log pi: (2, 1) - (log .75, log .25) = (2.2877, 2.3863): the tail class now wins."""
    counts = torch.tensor([3, 1])
    adjusted = posthoc_adjust(torch.tensor([[2.0, 1.0]]), counts)
    torch.testing.assert_close(adjusted, torch.tensor([[2 - math.log(0.75), 1 - math.log(0.25)]]))
    assert adjusted.argmax(1).item() == 1
    x = torch.tensor([[1.0, 0.0]])  # head logits: W x + b = (3 + 10, 1 - 10) = (13, -9)
    feats = _feats(W, B, torch.tensor([0, 0, 0, 1]), x, torch.tensor([0]))
    m = _method("logit_adjust_posthoc", feats, select="fixed", tau=1.0)
    torch.testing.assert_close(m.logits("val"), torch.tensor([[13 - math.log(0.75), -9 - math.log(0.25)]]))


def test_lws_starts_at_the_frozen_classifier_and_learns_only_its_scales():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = _feats(W, B, torch.tensor([0, 0, 1]), x, torch.tensor([0, 1]))
    m = _method("lws", feats)
    torch.testing.assert_close(m.logits("val"), x @ W.t() + B)  # scales start at 1
    assert [n for n, p in m.classifier().named_parameters() if p.requires_grad] == ["scales"]
    with torch.no_grad():
        m.classifier().scales.copy_(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(m.logits("val"), (x @ W.t() + B) * torch.tensor([0.5, 2.0]))


def test_crt_trains_a_fresh_linear_classifier_with_class_balanced_draws():
    feats = _feats(W, B, torch.tensor([0] * 9 + [1]), torch.ones(1, 2), torch.tensor([0]))
    m = _method("crt", feats)
    assert isinstance(m.head, LinearHead) and not torch.equal(m.head.weight, W)  # re-initialised
    assert m.ctx.train.sampler == "class_balanced"
    torch.testing.assert_close(m.weights[:9].sum(), m.weights[9:].sum())  # each class drawn alike
