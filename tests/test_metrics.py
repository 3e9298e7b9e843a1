"""Evaluation metrics: strict many/few thresholds, per-class means, empty buckets and absent classes."""

import math

import pytest
import torch

from ltstudy.metrics import accuracy_metrics, shot_masks


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
