"""COLA (Saeed et al., ICASSP 2021): two segments of one clip are a positive pair, the
second segments of the other clips are the negatives, similarity is bilinear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.heads import ObjectiveParts
from trainer.objectives.common import wide


class ColaHead(nn.Module):
    """Linear -> LayerNorm -> tanh: [N, in_dim] -> [N, dim] in (-1, 1), not normalised
    (the bilinear similarity learns its own scale)."""

    def __init__(self, in_dim: int, dim: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim), nn.Tanh())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Bilinear(nn.Module):
    """Holds W [dim, dim] of the similarity s(a, c) = a^T W c.

    W starts as the identity, so training starts from the plain dot product of the head's
    outputs; the start is deterministic, so every rank holds the same W without a broadcast.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))

    def forward(self, anchors: torch.Tensor) -> torch.Tensor:
        """anchors [N, dim] -> a^T W [N, dim] (float32 or wider): the anchors' side of the
        similarity, computed where W is (inside the model's forward)."""
        return project(anchors, self.weight)


class ColaParts(ObjectiveParts):
    """COLA's W inside the model: adds ``"aw"`` [B, dim], the first segments' a^T W."""

    def __init__(self, dim: int):
        super().__init__({"bilinear": Bilinear(dim)})

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"aw": self["bilinear"](out["z"][:, 0])}


def project(anchors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, D] x [D, D] -> [N, D], a^T W in float32 (or float64), also under autocast."""
    with torch.autocast(anchors.device.type, enabled=False):
        return wide(anchors) @ wide(weight)


def cola_projected_loss(projected: torch.Tensor, candidates: torch.Tensor, rank: int) -> torch.Tensor:
    """Mean multi-class cross-entropy of this rank's anchors over all candidates.

    projected: [B, D] this rank's anchors (first segments' head outputs) times the bilinear
    W, a^T W (:func:`project`; what :class:`ColaParts` adds); candidates: [W*B, D] second
    segments of all ranks' clips in rank order (gathered with gradient; pass this rank's
    [B, D] and rank 0 for in-batch negatives only). The positive of anchor i is candidate
    ``rank*B + i`` (the other segment of the same clip); the other W*B - 1 candidates are
    its negatives. Returns a scalar (float32, or float64 for float64 inputs), the mean over
    the B anchors: the mean of this over ranks is the loss of one process holding the
    global batch.
    """
    b = projected.shape[0]
    if candidates.shape[0] < (rank + 1) * b:
        raise ValueError(f"candidates hold {candidates.shape[0]} rows: too few for rank {rank} with B={b}")
    with torch.autocast(projected.device.type, enabled=False):
        logits = wide(projected) @ wide(candidates).T                           # [B, W*B]
    target = torch.arange(b, device=projected.device) + rank * b
    return F.cross_entropy(logits, target)
