"""Evaluation metrics for long-tailed recognition: top-1, many/medium/few-shot, per-class accuracy, and
calibration (ECE overall and per bucket, NLL, the reliability diagram's bins).

Groups follow the training count n_c of each class: many-shot n_c > ``many``, few-shot n_c < ``few``,
medium the rest (the convention of classifier-balancing's ``shot_acc``). A group's accuracy is the mean
of its classes' accuracies; a group with no class is NaN.

Calibration (Guo et al., ICML 2017): the confidence of a prediction is its top softmax probability; the
samples are put in ``ECE_BINS`` (15) equal-width confidence bins, and the expected calibration error is
``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``. The ECE of a bucket (many / medium / few) is the same sum
over the samples whose *true* class is in that bucket, as long-tail papers report it; NLL is the mean
negative log-likelihood of the true class.
"""

from __future__ import annotations

import math

import torch

from ltstudy.errors import NonFiniteLossError

#: equal-width confidence bins of the ECE and of the reliability diagram
ECE_BINS = 15


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


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Per equal-width confidence bin: the samples in it, their mean confidence and their accuracy (None for
    an empty bin, so the lists are JSON). A confidence of exactly ``k / bins`` falls in bin ``k - 1`` (bins
    are ``(lo, hi]``, the first one ``[0, 1/bins]``), as in Guo et al.'s reference implementation."""
    conf = confidence.detach().double().cpu()
    hit = correct.detach().double().cpu()
    index = (torch.ceil(conf * bins) - 1).clamp(0, bins - 1).long()
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
    safe = count.clamp_min(1)
    keep = (count > 0).tolist()
    return {"count": count.tolist(),
            "confidence": [v if k else None for v, k in zip((conf_sum / safe).tolist(), keep, strict=True)],
            "accuracy": [v if k else None for v, k in zip((hit_sum / safe).tolist(), keep, strict=True)]}


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> float:
    """``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over equal-width bins; NaN without samples."""
    if confidence.numel() == 0:
        return math.nan
    r = reliability_bins(confidence, correct, bins)
    n = sum(r["count"])
    return sum(c / n * abs(a - p) for c, a, p in zip(r["count"], r["accuracy"], r["confidence"], strict=True)
               if c > 0)


def summarise(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: the prediction, its confidence (top softmax probability) and the NLL of the true class:
    all an evaluation keeps of a batch's logits (a whole split's logits can be large: iNaturalist's 8,142
    classes)."""
    logp = torch.log_softmax(logits.detach().float(), dim=1)
    top, pred = logp.max(dim=1)
    nll = -logp.gather(1, labels.view(-1, 1).to(logp.device)).squeeze(1)
    return pred.cpu(), top.exp().cpu(), nll.cpu()


def calibration_from(pred: torch.Tensor, confidence: torch.Tensor, nll: torch.Tensor, labels: torch.Tensor,
                     class_counts: torch.Tensor, many: int = 100, few: int = 20, bins: int = ECE_BINS
                     ) -> tuple[dict[str, float], dict[str, list]]:
    """``ece``, ``ece_many`` / ``ece_medium`` / ``ece_few`` (samples whose true class is in the bucket),
    ``nll``, and the reliability diagram's bins of all samples."""
    labels = labels.cpu()
    if len(labels) == 0:
        return {"ece": math.nan, "nll": math.nan, **{f"ece_{g}": math.nan for g in ("many", "medium", "few")}}, \
            reliability_bins(torch.zeros(0), torch.zeros(0), bins)
    correct = pred.cpu() == labels
    out = {"ece": expected_calibration_error(confidence, correct, bins), "nll": nll.double().mean().item()}
    for group, mask in shot_masks(class_counts, many, few).items():
        rows = mask[labels]
        out[f"ece_{group}"] = expected_calibration_error(confidence[rows], correct[rows], bins) if rows.any() \
            else math.nan
    return out, reliability_bins(confidence, correct, bins)


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                        many: int = 100, few: int = 20, bins: int = ECE_BINS
                        ) -> tuple[dict[str, float], dict[str, list]]:
    """:func:`calibration_from` of a split's logits."""
    return calibration_from(*summarise(logits, labels), labels, class_counts, many, few, bins)


def evaluation_from(pred: torch.Tensor, confidence: torch.Tensor, nll: torch.Tensor, labels: torch.Tensor,
                    class_counts: torch.Tensor, many: int = 100, few: int = 20) -> tuple[dict[str, object], list[float]]:
    """Everything an evaluation reports: top-1, many / medium / few, ``loss`` (= ``nll``), ``ece`` overall and
    per bucket, and ``reliability`` (the diagram's bins); plus the per-class accuracy. Non-finite outputs (a
    network that diverged in the last steps of an epoch whose mean loss was still finite) raise
    :class:`~ltstudy.errors.NonFiniteLossError`, as a non-finite training loss does."""
    if not torch.isfinite(confidence).all():
        raise NonFiniteLossError(f"the network's outputs are not finite on {int((~torch.isfinite(confidence)).sum())} "
                                 f"of {confidence.numel()} evaluated samples (it diverged)")
    metrics, per_class = accuracy_metrics(pred, labels, class_counts, many, few)
    calibration, bins = calibration_from(pred, confidence, nll, labels, class_counts, many, few)
    out: dict[str, object] = {**metrics, **calibration, "loss": calibration["nll"], "reliability": bins}
    return out, per_class


def evaluation_metrics(logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor,
                       many: int = 100, few: int = 20) -> tuple[dict[str, object], list[float]]:
    """:func:`evaluation_from` of a split's logits."""
    return evaluation_from(*summarise(logits, labels), labels.cpu(), class_counts, many, few)
