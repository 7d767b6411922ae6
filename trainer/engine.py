"""How the model is replicated and stepped across ranks, behind one small interface.

The training loop only calls ``forward``, ``backward``, ``step``, ``state_dict`` and
``load_state_dict``; DDP lives here (DeepSpeed will sit behind the same methods).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import distributed


class DDPEngine:
    """PyTorch DDP (or a plain module on one process), autocast, clipping, LR schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, grad_clip: float = 0.0,
                 extra_params: list[nn.Parameter] | None = None):
        self.module = model.to(device)
        # trainable parameters outside the model (an objective's bilinear W or classifier):
        # DDP does not see them, so their gradients are averaged over ranks here
        self.extra_params = list(extra_params or [])
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.autocast_dtype, self.grad_clip = device, autocast_dtype, grad_clip
        self.model: nn.Module = model
        if distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            # buffers (BN running stats) agree across ranks by construction: global BN
            self.model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward(self, *args, **kwargs):
        with self.autocast():
            return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self):
        """Defer DDP's gradient all-reduce (for all but the last of several backwards)."""
        if isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients; returns the
        gradient norm before clipping (0 when clipping is off)."""
        norm = 0.0
        distributed.average_gradients(self.extra_params)
        if self.grad_clip > 0:
            params = [*self.module.parameters(), *self.extra_params]
            norm = float(nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


ENGINES = {"ddp": DDPEngine}
