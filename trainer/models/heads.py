"""Projection heads that map encoder embeddings to the space a contrastive loss uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear - BN - ReLU - Linear, L2-normalised output (SimCLR's MLP head).

    [N, in_dim] -> [N, out_dim] unit vectors.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False),
                                 nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=-1)


class ProjectionHeads(nn.Module):
    """``count`` independent :class:`ProjectionHead` s on one embedding, outputs side by side:
    [N, in_dim] -> [N, count * out_dim], each ``out_dim`` block a unit vector (LooC's spaces)."""

    def __init__(self, count: int, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.heads = nn.ModuleList(ProjectionHead(in_dim, hidden_dim, out_dim) for _ in range(count))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(h) for head in self.heads], dim=-1)


class LinearProjection(nn.Module):
    """One linear layer, L2-normalised output (NPID's 128-d and SoundCLR's 64-d projections)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(h), dim=-1)


class ObjectiveParts(nn.ModuleDict):
    """An objective's own trainable modules (COLA's bilinear W, SoundCLR's classifier).

    They live inside the model and are applied to its outputs in its forward: one module
    then holds every trained parameter, and an engine that shards parameters (ZeRO-3)
    materialises them where they are used, inside the forward of the module owning them.
    ``forward(out)`` returns the extra outputs the objective's loss reads (none here).
    """

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}


class ContrastiveModel(nn.Module):
    """Encoder + head applied to every view, then the objective's parts.

    views [B, V, C, F, T] -> {"h": [B, V, E] encoder embeddings, "z": [B, V, D] head
    outputs, and whatever ``parts`` adds}.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, parts: ObjectiveParts | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.parts = parts if parts is not None else ObjectiveParts()

    def forward(self, views: torch.Tensor) -> dict[str, torch.Tensor]:
        b, v = views.shape[:2]
        # views are stacked view-major so each BN batch mixes all clips of one view
        flat = views.transpose(0, 1).reshape(b * v, *views.shape[2:])
        h = self.encoder(flat)
        z = self.head(h)
        out = {"h": h.reshape(v, b, -1).transpose(0, 1), "z": z.reshape(v, b, -1).transpose(0, 1)}
        out.update(self.parts(out))
        return out
