"""Classification metrics of the evaluation protocols, in numpy (tests hold them to scikit-learn).

Single-label: class-averaged accuracy, macro F1, weighted average precision (wAP), and a
per-class precision / recall / F1 table. Multi-label: mAP and d' (from the ROC AUC, as
AudioSet results are reported).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def class_averaged_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of the fraction predicted right."""
    classes = np.unique(labels)
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in classes]))


def per_class_table(labels: np.ndarray, predictions: np.ndarray, classes: np.ndarray | None = None) -> dict:
    """{class: {"precision", "recall", "f1", "support"}} (0 where a ratio is undefined)."""
    if classes is None:
        classes = np.union1d(labels, predictions)
    table = {}
    for c in classes:
        tp = int(np.sum((predictions == c) & (labels == c)))
        predicted, actual = int(np.sum(predictions == c)), int(np.sum(labels == c))
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table[int(c)] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return table


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Unweighted mean F1 over the classes in ``labels`` or ``predictions``."""
    return float(np.mean([row["f1"] for row in per_class_table(labels, predictions).values()]))


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve of one class, as a step function over the
    distinct score thresholds (targets 0/1 [N], scores [N]); nan without positives."""
    positives = float(np.sum(targets))
    if positives == 0:
        return math.nan
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half); nan if a
    class has no positive or no negative."""
    pos, neg = int(np.sum(targets)), int(len(targets) - np.sum(targets))
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for lo, hi in zip(starts, ends):
        ranks[order[lo:hi]] = (lo + hi + 1) / 2  # average 1-based rank of a tie
    return float((ranks[targets == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def weighted_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Single-label wAP: each class's AP (one-vs-rest on ``scores`` [N, C]) weighted by its
    share of the clips."""
    aps, weights = [], []
    for c in range(scores.shape[1]):
        targets = (labels == c).astype(np.float64)
        if targets.sum():
            aps.append(average_precision(targets, scores[:, c]))
            weights.append(targets.sum())
    return float(np.average(aps, weights=weights))


def multilabel_metrics(targets: np.ndarray, scores: np.ndarray) -> dict:
    """mAP, mean AUC and d' = sqrt(2) * Phi^-1(mean AUC) of multi-hot ``targets`` [N, C]
    against ``scores`` [N, C], over the classes with at least one positive and one negative."""
    aps = [average_precision(targets[:, c], scores[:, c]) for c in range(targets.shape[1])]
    aucs = [roc_auc(targets[:, c], scores[:, c]) for c in range(targets.shape[1])]
    mean_ap = float(np.nanmean(aps))
    mean_auc = float(np.nanmean(aucs))
    clipped = min(max(mean_auc, 1e-12), 1 - 1e-12)
    return {"mAP": mean_ap, "auc": mean_auc, "d_prime": math.sqrt(2) * NormalDist().inv_cdf(clipped)}
