"""Cosine k-nearest-neighbour classification with similarity-weighted votes."""

from __future__ import annotations

import numpy as np


def knn_scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, num_classes: int, *,
               k: int, temperature: float, chunk: int = 1024) -> np.ndarray:
    """Class scores [M, num_classes] of ``test`` [M, D] against ``train`` [N, D] (both
    L2-normalised): each of the k most similar training rows votes for its label with
    weight ``exp(similarity / temperature)``; rows are normalised to sum to one.

    ``train_labels``: class ids [N], or multi-hot targets [N, C] (a row then votes for
    each of its labels, and a score is the weighted share of neighbours carrying it).
    """
    k = min(k, len(train))
    multi = train_labels.ndim == 2
    if multi:  # the gathered [chunk, k, C] targets must stay small
        chunk = max(1, min(chunk, 2 ** 24 // (k * num_classes)))
    out = np.zeros((len(test), num_classes), dtype=np.float64)
    for lo in range(0, len(test), chunk):
        sims = test[lo:lo + chunk] @ train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
        if multi:
            votes = np.einsum("mk,mkc->mc", weights, train_labels[top].astype(np.float64))
            out[lo:lo + chunk] = votes / weights.sum(axis=1, keepdims=True)
            continue
        rows = np.repeat(np.arange(len(top)), k)
        np.add.at(out[lo:lo + chunk], (rows, train_labels[top].ravel()), weights.ravel())
    if multi:
        return out
    return out / out.sum(axis=1, keepdims=True)
