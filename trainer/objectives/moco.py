"""MoCo v2: a queue of negative keys sharded across ranks, its exact loss, the momentum
encoder's EMA and its schedule.

The queue is one ring of K slots, written as a single process would write it: each step
the global batch of W*B keys (rank order) goes to slots ptr .. ptr+W*B-1 (mod K), and ptr
advances by W*B. Rank r stores slots r*K/W .. (r+1)*K/W - 1 and writes whichever of the
gathered keys land there. The full queue and the pointer therefore do not depend on the
world size, so a checkpoint resumes exactly at any other world size that divides K.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from trainer.objectives.common import restore_rows, seeded_unit_rows, slice_record, wide
from trainer.parallel import distributed


def initial_queue(size: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole queue before any key arrives: [size, dim] unit rows from ``seed`` (CPU;
    for tests: a rank draws only its own block)."""
    return seeded_unit_rows(0, size, dim, seed, dtype)


class ShardedQueue:
    """This rank's block of a ring of ``size`` keys (see the module docstring).

    ``shard``: [size / world_size, dim] keys (no gradient), drawn, saved and restored by
    this rank alone (as NPID's bank is). ``ptr``: the global write position in
    0 .. size-1, identical on every rank.
    """

    def __init__(self, size: int, dim: int, rank: int, world_size: int, device: torch.device | str = "cpu",
                 seed: int = 0, dtype: torch.dtype = torch.float32):
        if size % world_size:
            raise ValueError(f"queue_size {size} must be divisible by the world size {world_size}")
        self.size, self.dim, self.rank, self.world_size = size, dim, rank, world_size
        self.block = size // world_size
        self.lo, self.hi = rank * self.block, (rank + 1) * self.block
        self.ptr = 0
        self.shard = seeded_unit_rows(self.lo, self.hi, dim, seed, dtype).to(device)

    @torch.no_grad()
    def enqueue(self, keys_local: torch.Tensor) -> None:
        """Write the global batch of keys into the ring (collective: call on every rank).

        keys_local: [B, dim] this rank's keys; gathered to [W*B, dim] in rank order.
        """
        keys = distributed.gather_no_grad(keys_local.detach())
        n = keys.shape[0]
        if n > self.size:  # a single process would keep only the last `size` of them
            keys, self.ptr = keys[n - self.size:], (self.ptr + n - self.size) % self.size
            n = self.size
        slots = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        lo = self.rank * self.block
        mine = (slots >= lo) & (slots < lo + self.block)
        self.shard[(slots[mine] - lo).to(self.shard.device)] = keys[mine].to(self.shard)
        self.ptr = (self.ptr + n) % self.size

    def state_dict(self) -> dict:
        """What every rank shares: the queue's size and the global pointer (the keys:
        :meth:`slice_state`)."""
        return {"size": self.size, "ptr": self.ptr}

    def slice_state(self) -> dict:
        """This rank's block of slots, to be saved by this rank."""
        return slice_record(self.lo, self.hi, self.shard)

    def load_state_dict(self, state: dict, slices: Iterable[dict] = ()) -> None:
        """Take this rank's block from ``slices`` saved at any world size (a checkpoint of an
        older version keeps the whole queue in ``state["queue"]``). The ring order and the
        pointer are global, so nothing needs remapping."""
        rows = restore_rows(state, "queue", "size", self.size, slices, self.lo, self.hi, self.dim, "MoCo queue")
        self.shard = rows.to(device=self.shard.device, dtype=self.shard.dtype)
        self.ptr = int(state["ptr"]) % self.size


def moco_logits_loss(q_local: torch.Tensor, k_local: torch.Tensor, queue_shard: torch.Tensor, rank: int, *,
                     temperature: float) -> torch.Tensor:
    """InfoNCE of this rank's queries: the positive is the query's own key, the negatives
    are ALL K keys of the queue although this rank holds only K/W of them.

    q_local: [B, D] L2-normalised queries (with gradient); k_local: [B, D] their keys
    (momentum encoder, no gradient); queue_shard: [K/W, D] this rank's block of the queue.
    The queries of all ranks are gathered with gradient, each rank scores them against
    its block ([W*B, K/W]), ``distributed_logsumexp`` combines the blocks into the
    log-sum-exp over the whole queue, and this rank keeps its B rows. Returns the mean
    over the B queries of ``logaddexp(pos, lse_queue) - pos`` (pos = q.k / tau), a scalar
    in float32 (float64 for float64 queries): the cross-entropy of [pos, queue logits]
    at class 0. Mean over ranks == one process with batch W*B and the whole queue.
    Collective (through trainer.parallel.distributed helpers): call on every rank.
    """
    q = wide(q_local)
    b = q.shape[0]
    with torch.autocast(q.device.type, enabled=False):  # float32 logits under autocast too
        pos = (q * k_local.detach().to(q.dtype)).sum(1) / temperature            # [B]
        q_all = distributed.gather_with_grad(q)                                  # [W*B, D]
        block_logits = q_all @ queue_shard.detach().to(q.dtype).T / temperature  # [W*B, K/W]
        lse_queue = distributed.distributed_logsumexp(block_logits)[rank * b:(rank + 1) * b]
        return (torch.logaddexp(pos, lse_queue) - pos).mean()


@torch.no_grad()
def momentum_update(target_module: nn.Module, source_module: nn.Module, m: float) -> None:
    """EMA of parameters, ``t <- m * t + (1 - m) * s``; buffers (BN statistics) copied.
    The two modules must have the same structure (the key encoder is a copy)."""
    t_params, s_params = list(target_module.parameters()), list(source_module.parameters())
    t_bufs, s_bufs = list(target_module.buffers()), list(source_module.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise ValueError("momentum_update: target and source modules differ in structure")
    for t, s in zip(t_params, s_params):
        t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)
    for t, s in zip(t_bufs, s_bufs):
        t.copy_(s)


def cosine_momentum(step: int, total: int, base: float) -> float:
    """BYOL-style schedule from ``base`` at step 0 up to 1 at ``total``:
    ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2`` (step clamped to [0, total])."""
    frac = min(max(step, 0), total) / max(total, 1)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0


# objective.momentum_schedule: (step, total steps, objective.momentum) -> the EMA momentum
MOMENTUM_SCHEDULES = {"constant": lambda step, total, base: base, "cosine": cosine_momentum}
