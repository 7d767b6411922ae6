"""Cosine k-nearest-neighbour classification with similarity-weighted votes, scored in
blocks: a [chunk, block] similarity matrix at a time, never [M, N]."""

from __future__ import annotations

import numpy as np


def top_k(train, test: np.ndarray, k: int, *, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [M, k], indices into ``train`` [M, k]) of the ``k`` training rows most
    similar (dot product) to each of ``test`` [M, D], in no particular order; ``train`` is
    any [N, D] array that slices (a lazy one such as :class:`~trainer.evaluate.embed.Rows`
    included), read ``block`` rows at a time and kept as a running top-k."""
    best = np.full((len(test), k), -np.inf, dtype=np.float32)
    where = np.zeros((len(test), k), dtype=np.int64)
    for lo in range(0, len(train), block):
        cand = np.concatenate([best, test @ np.asarray(train[lo:lo + block]).T], axis=1)  # [M, k + b]
        keep = np.argpartition(-cand, k - 1, axis=1)[:, :k]  # < k: a kept one; else block row lo + (j - k)
        best = np.take_along_axis(cand, keep, axis=1)
        where = np.where(keep < k, np.take_along_axis(where, np.minimum(keep, k - 1), axis=1), lo + keep - k)
    return best, where


def knn_scores(train, train_labels: np.ndarray, test, num_classes: int, *,
               k: int, temperature: float, chunk: int = 512, block: int = 2048) -> np.ndarray:
    """Class scores [M, num_classes] of ``test`` [M, D] against ``train`` [N, D] (both
    L2-normalised; either may be a lazy array that slices): each of the k most similar
    training rows votes for its label with weight ``exp(similarity / temperature)``; rows
    are normalised to sum to one. Memory: a [chunk, k + block] block of similarities (and
    its int64 partition): about 13 MB by default, whatever N and M.

    ``train_labels``: class ids [N], or multi-hot targets [N, C] (a row then votes for
    each of its labels, and a score is the weighted share of neighbours carrying it).
    """
    k = min(k, len(train))
    multi = train_labels.ndim == 2
    if multi:  # the gathered [chunk, k, C] targets must stay small
        chunk = max(1, min(chunk, 2 ** 24 // (k * num_classes)))
    out = np.zeros((len(test), num_classes), dtype=np.float64)
    for lo in range(0, len(test), chunk):
        top_sims, top = top_k(train, np.asarray(test[lo:lo + chunk]), k, block=block)
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
