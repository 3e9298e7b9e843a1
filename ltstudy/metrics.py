"""Evaluation metrics for long-tailed recognition: top-1, many/medium/few-shot, per-class accuracy.

Groups follow the training count n_c of each class: many-shot n_c > ``many``, few-shot n_c < ``few``,
medium the rest (the convention of classifier-balancing's ``shot_acc``). A group's accuracy is the mean
of its classes' accuracies; a group with no class is NaN.
"""

from __future__ import annotations

import math

import torch


def shot_masks(class_counts: torch.Tensor, many: int = 100, few: int = 20) -> dict[str, torch.Tensor]:
    counts = class_counts.cpu()
    many_mask = counts > many
    few_mask = counts < few
    return {"many": many_mask, "medium": ~(many_mask | few_mask), "few": few_mask}


def accuracy_metrics(preds: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                     many: int = 100, few: int = 20) -> tuple[dict[str, float], list[float]]:
    """Top-1 and group accuracies (in [0, 1]) plus the per-class accuracy list."""
    preds, labels = preds.cpu(), labels.cpu()
    num_classes = len(class_counts)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    per_class = torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, math.nan))
    out = {"top1": (preds == labels).double().mean().item()}
    for group, mask in shot_masks(class_counts, many, few).items():
        vals = per_class[mask & (total > 0)]
        out[group] = vals.mean().item() if len(vals) else math.nan
    return out, per_class.tolist()
