"""Small pieces the losses share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def wide(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (for exactness tests); anything narrower is computed in float32."""
    return x if x.dtype == torch.float64 else x.float()


def seeded_unit_rows(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, dim] L2-normalised random rows from ``seed`` (CPU): the same on every rank,
    so a sharded queue or bank is one well-defined whole before training."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)
