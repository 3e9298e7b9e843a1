"""Evaluation metrics: strict many/few thresholds, per-class means, empty buckets and absent classes."""

import math

import pytest
import torch

from ltstudy.errors import NonFiniteLossError
from ltstudy.metrics import accuracy_metrics, evaluation_metrics, shot_masks


def test_bucket_edges_are_strict():
    masks = shot_masks(torch.tensor([101, 100, 50, 20, 19, 5]))
    assert masks["many"].tolist() == [True, False, False, False, False, False]
    assert masks["medium"].tolist() == [False, True, True, True, False, False]
    assert masks["few"].tolist() == [False, False, False, False, True, True]
    custom = shot_masks(torch.tensor([10, 5, 1]), many=5, few=2)
    assert [custom[g].tolist() for g in ("many", "medium", "few")] == [
        [True, False, False], [False, True, False], [False, False, True]]


def test_groups_average_per_class_accuracies_not_samples():
    counts = torch.tensor([500, 50, 5])  # one class per bucket
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    metrics, per_class = accuracy_metrics(preds, labels, counts)
    assert per_class == [0.75, 0.5, 1.0]
    assert metrics["top1"] == pytest.approx(5 / 7)
    assert (metrics["many"], metrics["medium"], metrics["few"]) == (0.75, 0.5, 1.0)


def test_empty_bucket_is_nan_and_an_absent_class_is_left_out():
    counts = torch.tensor([500, 400, 50, 60])  # no few-shot class
    labels = torch.tensor([0, 1, 2, 2])  # class 3 has no evaluation sample
    preds = torch.tensor([0, 0, 2, 1])
    metrics, per_class = accuracy_metrics(preds, labels, counts)
    assert math.isnan(metrics["few"])
    assert math.isnan(per_class[3]) and per_class[:3] == [1.0, 0.0, 0.5]
    assert metrics["many"] == 0.5 and metrics["medium"] == 0.5  # class 3 does not drag medium down


def _logits_with_confidence(conf: list[float], pred: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose softmax puts ``conf`` on ``pred`` and spreads the rest evenly (log-probabilities)."""
    probs = torch.tensor([[(1 - c) / (num_classes - 1)] * num_classes for c in conf], dtype=torch.float64)
    for i, (c, p) in enumerate(zip(conf, pred, strict=True)):
        probs[i, p] = c
    return probs.log()


def test_ece_and_nll_against_a_hand_computed_case():
    """Six samples of three classes (one per bucket). Confidences 0.95, 0.9 (bins 14 and 13 of 15), 0.63 and
    0.65 (both in bin 9, (0.6, 0.667]), 0.5 (bin 7) and 0.42 (bin 6):
    bin 14: conf 0.95, acc 1 -> 0.05 x 1/6; bin 13: 0.9, acc 0 -> 0.9 x 1/6;
    bin 9: conf 0.64, acc 1/2 -> 0.14 x 2/6; bin 7: 0.5, acc 1 -> 0.5 x 1/6; bin 6: 0.42, acc 0 -> 0.42 x 1/6.
    ECE = (0.05 + 0.9 + 0.28 + 0.5 + 0.42) / 6 = 2.15 / 6."""
    from ltstudy.metrics import calibration_metrics, expected_calibration_error

    conf = [0.95, 0.9, 0.63, 0.65, 0.5, 0.42]
    pred = [0, 1, 1, 2, 2, 0]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    correct = torch.tensor(pred) == labels
    assert correct.tolist() == [True, False, True, False, True, False]
    assert expected_calibration_error(torch.tensor(conf, dtype=torch.float64), correct) == pytest.approx(2.15 / 6)
    counts = torch.tensor([500, 50, 5])  # class 0 many, 1 medium, 2 few
    metrics, bins = calibration_metrics(_logits_with_confidence(conf, pred, 3), labels, counts)
    assert metrics["ece"] == pytest.approx(2.15 / 6, abs=1e-6)
    # per bucket: the samples of the bucket's classes. many {0.95 right, 0.9 wrong} in two bins:
    # (0.05 + 0.9) / 2; medium {0.63 right, 0.65 wrong} in one bin: |0.5 - 0.64|; few {0.5 right, 0.42 wrong}:
    # (0.5 + 0.42) / 2
    assert metrics["ece_many"] == pytest.approx(0.95 / 2, abs=1e-6)
    assert metrics["ece_medium"] == pytest.approx(0.14, abs=1e-6)
    assert metrics["ece_few"] == pytest.approx(0.46, abs=1e-6)
    # NLL: the true class's probability is conf where right, (1 - conf) / 2 where wrong
    p_true = [0.95, 0.05, 0.63, 0.175, 0.5, 0.29]
    assert metrics["nll"] == pytest.approx(-sum(math.log(p) for p in p_true) / 6, abs=1e-6)
    assert bins["count"][13:15] == [1.0, 1.0] and bins["count"][9] == 2.0 and bins["count"][6] == 1.0 and sum(bins["count"]) == 6
    assert bins["accuracy"][9] == pytest.approx(0.5) and bins["confidence"][9] == pytest.approx(0.64)
    assert bins["accuracy"][0] is None and bins["confidence"][0] is None  # an empty bin


def test_bins_are_right_closed_and_a_perfectly_calibrated_set_has_zero_ece():
    from ltstudy.metrics import expected_calibration_error, reliability_bins

    edges = reliability_bins(torch.tensor([1 / 15, 2 / 15, 1.0], dtype=torch.float64), torch.ones(3))
    assert edges["count"][0] == 1 and edges["count"][1] == 1 and edges["count"][14] == 1
    # 10 samples at confidence 0.7 of which 7 are right: calibrated
    conf = torch.full((10,), 0.7, dtype=torch.float64)
    assert expected_calibration_error(conf, torch.arange(10) < 7) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(conf, torch.arange(10) < 2) == pytest.approx(0.5)


def test_non_finite_outputs_are_a_diverged_network_not_a_bincount_error():
    """A network whose weights became NaN in an epoch's last steps (its mean loss still finite) fails the trial
    as a non-finite loss does, naming it, rather than with torch's bincount error from the calibration bins."""
    logits = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [0.5, 0.1]])
    labels = torch.tensor([1, 0, 0])
    with pytest.raises(NonFiniteLossError, match="not finite on 1 of 3 evaluated samples"):
        evaluation_metrics(logits, labels, torch.tensor([10, 2]))
