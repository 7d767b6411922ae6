"""Small pieces the losses share, and the rows of state sharded over ranks (NPID's memory
bank, MoCo's queue): drawn slice by slice, saved slice by slice, re-sliced on resume."""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROW_BLOCK = 4096  # rows drawn from one generator: the fixed grain that makes a slice the same at any world size


def wide(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (for exactness tests); anything narrower is computed in float32."""
    return x if x.dtype == torch.float64 else x.float()


LSE_BLOCK_BYTES = 32 << 20  # the logits held at once by rows_logsumexp


class _RowsLogSumExp(torch.autograd.Function):
    """``logsumexp(z @ rows.T / t, 1)`` computed over blocks of ``rows``, forward and
    backward, so the [Q, N] logits are never held whole (gradient for ``z`` only)."""

    @staticmethod
    def forward(ctx, z, rows, temperature, block):
        lse = torch.full((z.shape[0],), -math.inf, dtype=z.dtype, device=z.device)
        for part in rows.split(block):
            lse = torch.logaddexp(lse, torch.logsumexp(z @ part.T / temperature, dim=1))
        ctx.save_for_backward(z, rows, lse)
        ctx.temperature, ctx.block = temperature, block
        return lse

    @staticmethod
    def backward(ctx, grad):
        z, rows, lse = ctx.saved_tensors
        grad_z = torch.zeros_like(z)
        for part in rows.split(ctx.block):
            p = torch.exp(z @ part.T / ctx.temperature - lse[:, None])
            grad_z += (p * grad[:, None] / ctx.temperature) @ part
        return grad_z, None, None, None


def rows_logsumexp(z: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """[Q] ``logsumexp(z @ rows.T / temperature, dim=1)`` for queries z [Q, D] against
    rows [N, D] (no gradient for ``rows``), holding at most LSE_BLOCK_BYTES of logits at a
    time in the forward and the backward pass: a memory bank of millions of rows costs its
    rows, not Q times them. -inf for N = 0."""
    block = max(1, LSE_BLOCK_BYTES // (z.element_size() * max(z.shape[0], 1)))
    return _RowsLogSumExp.apply(z, rows.detach().to(z.dtype), temperature, block)


def block_seed(seed: int, block: int) -> int:
    """The generator seed of row block ``block`` (a 64-bit number from (seed, block))."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, block]).generate_state(1, np.uint64)[0])


def seeded_unit_rows(lo: int, hi: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``lo .. hi-1`` [hi-lo, dim] of one fixed matrix of L2-normalised Gaussian rows
    (CPU): row i is a function of (seed, i, dtype) alone, drawn in blocks of ROW_BLOCK rows
    keyed by (seed, block). So a rank draws only the slice it keeps, in the dtype it keeps,
    and the slices of any world size make up the same whole. The blocks are drawn on the
    process's torch threads at once (a rank of a GPU node has several)."""
    out = torch.empty(max(hi - lo, 0), dim, dtype=dtype)

    def draw(block: int) -> None:
        start = block * ROW_BLOCK
        a, b = max(lo, start), min(hi, start + ROW_BLOCK)
        g = torch.Generator().manual_seed(block_seed(seed, block))
        rows = out[a - lo:b - lo]
        if b - a == ROW_BLOCK:  # a whole block is drawn in place (a third of the time at 1M rows)
            torch.randn(ROW_BLOCK, dim, generator=g, dtype=dtype, out=rows)
        else:
            rows.copy_(torch.randn(ROW_BLOCK, dim, generator=g, dtype=dtype)[a - start:b - start])
        rows.div_(torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-12))  # as F.normalize, in place

    blocks = range(lo // ROW_BLOCK, -(-hi // ROW_BLOCK))
    threads = min(torch.get_num_threads(), len(blocks))
    if threads > 1:  # torch releases the GIL while it draws
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(draw, blocks))
    else:
        for block in blocks:
            draw(block)
    return out


def slice_record(lo: int, hi: int, rows: torch.Tensor) -> dict:
    """What a rank saves of its rows ``lo .. hi-1``: on the CPU, the live rows themselves
    where they are there (no copy of a large bank: save it before the next update)."""
    return {"lo": int(lo), "hi": int(hi), "rows": rows.detach().cpu()}


def rows_from_slices(records: Iterable[dict], lo: int, hi: int, dim: int, what: str) -> torch.Tensor:
    """Rows ``lo .. hi-1`` assembled from saved slice records (:func:`slice_record`, saved at
    any world size, read one at a time); ValueError naming ``what`` and the rows when a
    record is malformed or the records leave a row uncovered."""
    n = max(hi - lo, 0)
    out, covered = None, torch.zeros(n, dtype=torch.bool)
    for rec in records:
        a, b, rows = int(rec["lo"]), int(rec["hi"]), rec["rows"]
        if tuple(rows.shape) != (b - a, dim):
            raise ValueError(f"a saved {what} slice of rows {a}..{b - 1} holds {tuple(rows.shape)}, "
                             f"not {(b - a, dim)}")
        x, y = max(a, lo), min(b, hi)
        if x < y:
            out = torch.empty(n, dim, dtype=rows.dtype) if out is None else out
            out[x - lo:y - lo] = rows[x - a:y - a]
            covered[x - lo:y - lo] = True
    if not covered.all():
        gap = int((~covered).nonzero()[0]) + lo
        raise ValueError(f"the saved {what} slices do not cover rows {lo}..{hi - 1} (row {gap} is in none of "
                         f"them): a rank's file of the checkpoint is missing or from another run")
    return torch.empty(0, dim) if out is None else out


def restore_rows(state: dict, whole_key: str, count_key: str, rows: int, slices: Iterable[dict], lo: int, hi: int,
                 dim: int, what: str) -> torch.Tensor:
    """Rows ``lo .. hi-1`` of a ``rows``-row state from the slices saved at any world size,
    or from the whole tensor a checkpoint of an older version kept in ``state[whole_key]``;
    ValueError naming ``what`` when the saved state has another number of rows."""
    whole = state.get(whole_key)
    if isinstance(whole, torch.Tensor):
        slices = [slice_record(0, whole.shape[0], whole)]
    saved = whole.shape[0] if isinstance(whole, torch.Tensor) else int(state.get(count_key, rows))
    if saved != rows:
        raise ValueError(f"saved {what} has {saved} rows, expected {rows}")
    return rows_from_slices(slices, lo, hi, dim, what)
