"""PyTorch DDP, or the plain module on one process: every rank holds the whole model and
optimizer, gradients are averaged in DDP's buckets (timed by a comm hook), rank 0 saves."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel import distributed
from trainer.parallel.engine import Engine, load_weights, save_weights
from trainer.safe_files import CheckpointError, load_tensors, save_tensors

OPTIMIZER = "optimizer.pt"  # the optimizer and schedule state


class DDPEngine(Engine):
    """PyTorch DDP (or the plain module on one process), autocast, clipping, LR schedule.
    Every rank holds the whole model and optimizer; rank 0 saves them."""

    name = "ddp"

    @classmethod
    def resume_hint(cls, saved: dict) -> str:
        return (f"It holds DDP state from {saved.get('world_size', '?')} rank(s): resume it with "
                f"train.engine=ddp (any world size)")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, *, grad_clip: float = 0.0, batch_size: int = 1,
                 settings=None):
        super().__init__(model, optimizer, scheduler, device, autocast_dtype)
        self.module = model.to(device)
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.model: nn.Module = model
        if distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            # buffers (BN running stats) agree across ranks by construction: global BN
            self.model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def forward(self, *args, **kwargs):
        with self.autocast():
            return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def watch_allreduce(self, telemetry) -> bool:
        if not isinstance(self.model, DistributedDataParallel):
            return False
        time_allreduce(self.model, telemetry)
        return True

    def accumulating(self):
        """Backwards inside add their gradients without DDP's all-reduce; the next
        backward outside reduces the sum."""
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients; returns the
        gradient norm before clipping (0 when clipping is off)."""
        norm = 0.0
        if self.grad_clip > 0:
            norm = float(nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, folder: Path) -> None:
        """Rank 0 writes the model (``weights.safetensors``) and the optimizer and schedule
        (``optimizer.pt``): every rank holds the same."""
        if distributed.env_info().is_main:
            save_weights(self.module, folder)
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            save_tensors(folder / OPTIMIZER, state)

    def load(self, folder: Path) -> None:
        load_weights(self.module, folder)
        state = load_tensors(folder / OPTIMIZER)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{folder / OPTIMIZER} does not fit this optimizer "
                                  f"({str(err).splitlines()[0][:300]})") from None


def time_allreduce(ddp_model: DistributedDataParallel, telemetry) -> None:
    """A DDP comm hook doing what the built-in one does (average each gradient bucket over
    ranks) and adding the time from launch to completion to ``telemetry.allreduce_seconds``.
    With NCCL the completion is when the work is queued on the stream, so there it times
    the launch."""
    def hook(state, bucket):
        start = time.perf_counter()

        def done(fut):
            telemetry.allreduce_seconds += time.perf_counter() - start
            return fut.value()
        return allreduce_hook(None, bucket).then(done)

    ddp_model.register_comm_hook(None, hook)
