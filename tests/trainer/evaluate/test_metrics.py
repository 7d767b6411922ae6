"""The evaluation metrics equal scikit-learn's on hand-made predictions."""

import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn import metrics as skm

from trainer.evaluate.metrics import (
    average_precision,
    class_averaged_accuracy,
    macro_f1,
    multilabel_metrics,
    per_class_table,
    roc_auc,
    weighted_average_precision,
)


@pytest.fixture
def single():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    scores = rng.random((60, 4)) + np.eye(4)[labels] * rng.random((60, 1))  # informative, with ties below
    scores[:5] = 0.5
    return labels, scores, scores.argmax(axis=1)


def test_single_label_metrics_equal_sklearn(single):
    labels, scores, preds = single
    assert class_averaged_accuracy(labels, preds) == pytest.approx(skm.balanced_accuracy_score(labels, preds))
    assert macro_f1(labels, preds) == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    onehot = np.eye(4)[labels]
    assert weighted_average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(onehot, scores, average="weighted"))
    table = per_class_table(labels, preds)
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, zero_division=0)
    for c in range(4):
        assert (table[c]["precision"], table[c]["recall"], table[c]["f1"]) == pytest.approx((p[c], r[c], f[c]))
        assert table[c]["support"] == s[c]


def test_ap_and_auc_with_ties_equal_sklearn():
    targets = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    scores = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.1, 0.3, 0.3])
    assert average_precision(targets, scores) == pytest.approx(skm.average_precision_score(targets, scores))
    assert roc_auc(targets, scores) == pytest.approx(skm.roc_auc_score(targets, scores))
    assert math.isnan(average_precision(np.zeros(3), np.ones(3)))


def test_multi_label_metrics_equal_sklearn():
    rng = np.random.default_rng(1)
    targets = (rng.random((50, 5)) < 0.3).astype(float)
    targets[0, :] = 1  # every class has a positive
    scores = rng.random((50, 5)) + 0.7 * targets
    got = multilabel_metrics(targets, scores)
    assert got["mAP"] == pytest.approx(skm.average_precision_score(targets, scores, average="macro"))
    auc = skm.roc_auc_score(targets, scores, average="macro")
    assert got["auc"] == pytest.approx(auc)
    assert got["d_prime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(auc))
