"""The one home of collectives: process-group setup, rank info, gathers and reductions.

Every helper returns the single-process answer when no process group exists, so the
rest of the code never branches on "distributed or not".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class PeerLost(RuntimeError):
    """Another rank stopped answering inside a collective (it crashed, or its node is gone)."""


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo/transport",
              "NCCL communicator was aborted")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err``, raised by a collective, says another rank is gone."""
    return isinstance(err, (dist.DistBackendError, dist.DistNetworkError)) or any(s in str(err) for s in _PEER_GONE)


def env_info() -> DistInfo:
    """Rank info from torchrun's environment (defaults: one process)."""
    return DistInfo(rank=int(os.environ.get("RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device_type: str, timeout_s: float = 1800.0, always: bool = False) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); ``always``:
    a group of one as well when there is a single process (DeepSpeed wants a group)."""
    info = env_info()
    if is_initialized():
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if info.world_size > 1:
        store = restart_store(info, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=timeout)
    elif always:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return info


def restart_store(info: DistInfo, timeout: datetime.timedelta) -> dist.Store | None:
    """After an elastic restart, the store this attempt's ranks meet in, or None for
    torch's own. torchrun hands its ranks the store of the agent, which outlives restarts
    and still holds the addresses the lost attempt's ranks published: a rank of the new
    attempt can read a dead peer's address before the peer replaces it, and fails to
    connect or hangs. Each attempt therefore gets keys of its own. The restart count is
    the agent's: the same on one node, and on several nodes when every node's ranks
    failed; launchers that may lose a whole node set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    and each attempt then gets a new store (torch's own path)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                           is_master=False, timeout=timeout)
    return dist.PrefixStore(f"audioclr/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", client)


def close() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums, over ranks, the gradients of every rank's copy of
    the local slice: the gradient of the sum of all ranks' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks; every rank's output depends on every input, so the backward is
    the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each rank -> [world_size * B, ...], rank order, gradients flowing back.

    With each rank's loss computed over its local anchors and DDP averaging gradients,
    the result equals the gradient of the mean loss over the global batch.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable (for batch statistics of synced BN)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on each rank -> [world_size * B, ...] without gradient."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def _reduce(values: dict[str, float], device: torch.device, op) -> dict[str, float]:
    """``op`` of each scalar over ranks, one collective for all of them."""
    if not values or not is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return dict(zip(keys, t.tolist()))


def reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks."""
    world = dist.get_world_size() if is_initialized() else 1
    return {k: v / world for k, v in _reduce(values, device, dist.ReduceOp.SUM).items()}


def reduce_max(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The largest value of each scalar over ranks."""
    return _reduce(values, device, dist.ReduceOp.MAX)


def reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalar counts over ranks."""
    return _reduce(values, device, dist.ReduceOp.SUM)


@torch.no_grad()
def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on at least one (a SIGTERM, a NaN),
    so all ranks take the same branch; one collective for all flags."""
    if not is_initialized():
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (one collective)."""
    if not is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def distributed_logsumexp(local_logits: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the columns of every rank: [Q, n_r] on each rank -> [Q].

    The Q rows are the same queries on every rank; each rank holds a different block of
    columns (its shard of a queue or memory bank; n_r may differ between ranks, even be 0).
    Each rank reduces its own block to a [Q] log-sum-exp, the W partial results are
    gathered with gradient and combined: log sum_r exp(lse_r) is exactly the log-sum-exp
    of all columns. Differentiable: with each rank's loss a term of the global objective,
    every rank's ``local_logits`` gets the gradient of the sum of all ranks' losses
    (the ``gather_with_grad`` convention). No process group: ``torch.logsumexp(x, 1)``.
    """
    return combine_logsumexp(torch.logsumexp(local_logits, dim=1))


def combine_logsumexp(local: torch.Tensor) -> torch.Tensor:
    """Each rank's [Q] log-sum-exp over its own columns -> [Q] over every rank's columns
    (gathered with gradient, as :func:`distributed_logsumexp`). No process group: ``local``."""
    if not is_initialized() or dist.get_world_size() == 1:
        return local
    return torch.logsumexp(_GatherWithGrad.apply(local[None]), dim=0)
