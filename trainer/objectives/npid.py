"""NPID (Wu et al. 2018): instance discrimination against a memory bank holding one unit
vector per clip, sharded across ranks, with the exact softmax or NCE.

Rank r owns the contiguous rows ``r*ceil(N/W) .. min((r+1)*ceil(N/W), N) - 1`` (the last
block is shorter, possibly empty). Every rank sees the whole global batch (embeddings
gathered with gradient, indices gathered), scores it against the rows it owns, and the
partial results are combined with the gradient-carrying helpers of trainer.parallel.distributed,
so the loss is exactly the one over the whole bank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from trainer.objectives.common import restore_rows, rows_logsumexp, seeded_unit_rows, slice_record, wide
from trainer.parallel import distributed


def initial_bank(num_rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole bank before training: [num_rows, dim] unit rows from ``seed`` (CPU; for
    tests: a rank draws only its own rows)."""
    return seeded_unit_rows(0, num_rows, dim, seed, dtype)


class ShardedMemoryBank:
    """This rank's rows ``lo .. hi-1`` of an N x dim memory bank (``shard``, no gradient),
    the row momentum, and NCE's normalising constant ``nce_z`` (None until estimated).

    Born sharded: each rank draws only its rows (a function of the row and the seed, so
    the bank is the same at any world size), saves only its rows (:meth:`slice_state`) and
    on resume takes its rows from the saved slices of any world size. Nothing ever holds
    the whole bank."""

    def __init__(self, num_rows: int, dim: int, rank: int, world_size: int, momentum: float,
                 device: torch.device | str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32):
        if num_rows < 1:
            raise ValueError("the memory bank needs at least one row (the dataset's clip count)")
        self.num_rows, self.dim, self.rank, self.world_size = num_rows, dim, rank, world_size
        self.momentum = momentum
        self.block = math.ceil(num_rows / world_size)
        self.lo = min(rank * self.block, num_rows)
        self.hi = min(self.lo + self.block, num_rows)
        self.shard = seeded_unit_rows(self.lo, self.hi, dim, seed, dtype).to(device)
        self.nce_z: float | None = None

    def owned(self, indices: torch.Tensor) -> torch.Tensor:
        """Bool mask of the (global) row indices this rank stores."""
        return (indices >= self.lo) & (indices < self.hi)

    @torch.no_grad()
    def update(self, indices_all: torch.Tensor, z_all: torch.Tensor) -> None:
        """``v <- normalise(m * v + (1 - m) * z)`` for the rows this rank owns.

        indices_all: [W*B] global row of each clip of the global batch; z_all: [W*B, dim]
        its embeddings (gathered, detached here). A row named twice takes the last update.
        """
        idx = indices_all.to(self.shard.device).long()
        mine = self.owned(idx)
        rows, z = idx[mine] - self.lo, z_all.detach().to(self.shard)[mine]
        if rows.numel() == 0:
            return
        order = torch.arange(rows.numel(), device=rows.device)
        last = torch.full((self.hi - self.lo,), -1, device=rows.device).scatter_reduce(0, rows, order, "amax")
        keep = last[rows] == order
        rows, z = rows[keep], z[keep]
        self.shard[rows] = F.normalize(self.momentum * self.shard[rows] + (1.0 - self.momentum) * z, dim=1)

    def state_dict(self) -> dict:
        """What every rank shares: the bank's size and ``nce_z`` (the rows: :meth:`slice_state`)."""
        return {"num_rows": self.num_rows, "nce_z": self.nce_z}

    def slice_state(self) -> dict:
        """This rank's rows, to be saved by this rank."""
        return slice_record(self.lo, self.hi, self.shard)

    def load_state_dict(self, state: dict, slices: Iterable[dict] = ()) -> None:
        """Take this rank's rows from ``slices`` saved at any world size (a checkpoint of
        an older version keeps the whole bank in ``state["bank"]``)."""
        rows = restore_rows(state, "bank", "num_rows", self.num_rows, slices, self.lo, self.hi, self.dim,
                            "memory bank")
        self.shard = rows.to(device=self.shard.device, dtype=self.shard.dtype)
        self.nce_z = None if state.get("nce_z") is None else float(state["nce_z"])


def _owned_dots(z_all: torch.Tensor, indices: torch.Tensor, bank: ShardedMemoryBank) -> torch.Tensor:
    """[Q, D] queries x [Q, M] global row indices -> [Q, M] dot products, summed over ranks.

    Each rank fills the entries whose row it owns (zeros elsewhere); the sum over ranks
    (with gradient) is then every entry exactly once. Memory is Q*M*D/W, not Q*N.
    """
    mine = bank.owned(indices)
    q, c = mine.nonzero(as_tuple=True)
    rows = bank.shard.to(z_all.dtype)[indices[q, c] - bank.lo]
    vals = (z_all[q] * rows).sum(1)
    part = torch.zeros(indices.shape, dtype=z_all.dtype, device=z_all.device).index_put((q, c), vals)
    return distributed.all_reduce_sum_with_grad(part)


def npid_exact_loss(z_local: torch.Tensor, z_all: torch.Tensor, indices_all: torch.Tensor,
                    bank: ShardedMemoryBank, rank: int, *, temperature: float) -> torch.Tensor:
    """``-log softmax`` over ALL N bank rows at the clip's own row, mean over local clips.

    z_local: [B, D] this rank's L2-normalised embeddings; z_all: [W*B, D] all ranks' in
    rank order, gathered WITH gradient; indices_all: [W*B] their bank rows. Each rank
    scores the global batch against its rows ([W*B, N/W]); ``combine_logsumexp`` gives
    the log-sum-exp over the whole bank; the positive logit comes from the owner of the
    row (summed over ranks with gradient). The [W*B, n_r] logits are computed in blocks
    (:func:`rows_logsumexp`), never held whole. Scalar, float32 (float64 for float64 input);
    mean over ranks == one process with batch W*B and the whole bank. Collective.
    """
    z = wide(z_all)
    b = z_local.shape[0]
    idx = indices_all.to(z.device).long()
    with torch.autocast(z.device.type, enabled=False):  # float32 logits under autocast too
        local = rows_logsumexp(z, bank.shard, temperature)                     # [W*B] over this rank's rows
        lse = distributed.combine_logsumexp(local)[rank * b:(rank + 1) * b]
        pos = _owned_dots(z, idx[:, None], bank)[rank * b:(rank + 1) * b, 0] / temperature
        return (lse - pos).mean()


def npid_nce_loss(z_local: torch.Tensor, z_all: torch.Tensor, indices_all: torch.Tensor,
                  bank: ShardedMemoryBank, rank: int, *, temperature: float, num_noise: int,
                  generator: torch.Generator) -> torch.Tensor:
    """NCE of Wu et al. 2018 with ``num_noise`` (m) uniform noise rows per query.

    Shapes as in ``npid_exact_loss``. ``P(i|v) = exp(v.f_i / tau) / Z`` with Z estimated
    once, from the first batch, as N * mean(exp(noise logits)) over the global batch and
    kept in ``bank.nce_z`` (this call sets it: the one piece of state a loss touches);
    ``h = P / (P + m/N)``; per query ``-(log h(pos) + sum_noise log(1 - h(noise)))``, mean
    over local queries (computed in log space). The [W*B, m] noise rows are drawn from
    ``generator`` (same seed on all ranks, so all ranks draw the same rows and the
    generator stays in step); each rank computes the dot products for the rows it owns
    and they are summed over ranks with gradient. Scalar; collective.
    """
    z = wide(z_all)
    b, n = z_local.shape[0], bank.num_rows
    idx = indices_all.to(z.device).long()
    noise = torch.randint(0, n, (idx.shape[0], num_noise), generator=generator).to(z.device)
    with torch.autocast(z.device.type, enabled=False):  # float32 logits under autocast too
        dots = _owned_dots(z, torch.cat([idx[:, None], noise], 1), bank) / temperature  # [W*B, 1+m]
    if bank.nce_z is None:
        bank.nce_z = float(n * dots[:, 1:].detach().exp().mean())
    log_p = dots[rank * b:(rank + 1) * b] - math.log(bank.nce_z)
    log_noise = math.log(num_noise / n)
    log_denom = torch.logaddexp(log_p, torch.full_like(log_p, log_noise))
    log_h_pos = log_p[:, 0] - log_denom[:, 0]
    log_not_h_noise = log_noise - log_denom[:, 1:]
    return -(log_h_pos + log_not_h_noise.sum(1)).mean()
