"""Cosine k-nearest-neighbour classification with similarity-weighted votes."""

from __future__ import annotations

import numpy as np


def knn_scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, num_classes: int, *,
               k: int, temperature: float, chunk: int = 1024) -> np.ndarray:
    """Class scores [M, num_classes] of ``test`` [M, D] against ``train`` [N, D] (both
    L2-normalised): each of the k most similar training rows votes for its label with
    weight ``exp(similarity / temperature)``; rows are normalised to sum to one."""
    k = min(k, len(train))
    out = np.zeros((len(test), num_classes), dtype=np.float64)
    for lo in range(0, len(test), chunk):
        sims = test[lo:lo + chunk] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
        rows = np.repeat(np.arange(len(top)), k)
        np.add.at(out[lo:lo + chunk], (rows, train_labels[top].ravel()), weights.ravel())
    return out / out.sum(axis=1, keepdims=True)
