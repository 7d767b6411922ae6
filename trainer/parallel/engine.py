"""How the model is replicated, stepped and saved across ranks, behind one interface.

The training loop asks an engine for exactly these: ``forward``, ``backward``,
``accumulating()`` (backwards whose gradients add up before one step), ``step() -> grad
norm``, ``train()`` / ``eval()``, ``gathered()`` (the full module, for a momentum
update or the encoder export, even where parameters are sharded), and ``save(folder)``
/ ``load(folder)``, which every rank calls inside the checkpointer's write-then-rename.
The module it trains holds every trained parameter (model and objective parts), and the
losses gather embeddings across ranks themselves (``trainer.parallel.distributed``), so
an engine only replicates, reduces gradients, steps and saves.

``DDPEngine`` (PyTorch DDP, or the plain module on one process) is here;
``trainer.parallel.deepspeed_engine`` holds DeepSpeed's ZeRO 0-3.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel import ENGINES, distributed
from trainer.safe_files import CheckpointError, durable_write, load_tensors, save_tensors

WEIGHTS = "weights.safetensors"  # the whole model, written by every engine (rank 0)
OPTIMIZER = "optimizer.pt"  # DDP's optimizer and schedule state


class Engine:
    """The interface; subclasses fill it in."""

    name = ""
    module: nn.Module  # the unwrapped model (under ZeRO-3: placeholders outside forward / gathered)

    def __init__(self, device: torch.device, autocast_dtype: torch.dtype | None):
        self.device, self.autocast_dtype = device, autocast_dtype

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.train(False)

    @contextlib.contextmanager
    def gathered(self):
        """The module with every parameter whole, on every rank, for reading (a collective
        where parameters are sharded: enter it on all ranks; changes made inside are not
        kept there)."""
        yield self.module

    def watch_allreduce(self, telemetry) -> bool:
        """Have the gradient all-reduce timed into ``telemetry``; False where it cannot be."""
        return False

    def saved_as(self) -> dict:
        """What a checkpoint of this engine holds, for meta.json and the resume check."""
        return {"engine": self.name}

    def can_load(self, saved: dict, world_size: int, saved_world_size: int) -> str | None:
        """None when a checkpoint described by ``saved`` resumes here, else why not."""
        if saved.get("engine", "ddp") != self.name:
            return f"it was written by the {saved.get('engine', 'ddp')} engine and this run uses {self.name}"
        return None


class DDPEngine(Engine):
    """PyTorch DDP (or the plain module on one process), autocast, clipping, LR schedule.
    Every rank holds the whole model and optimizer; rank 0 saves them."""

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, grad_clip: float = 0.0):
        super().__init__(device, autocast_dtype)
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
        from trainer.telemetry import time_allreduce
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


def save_weights(module: nn.Module, folder: Path) -> None:
    """``folder/weights.safetensors``: every parameter and buffer of ``module``, fsynced."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    durable_write(folder / WEIGHTS, lambda f: f.write(save(tensors)))


def load_weights(module: nn.Module, folder: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    try:
        module.load_state_dict(load_file(str(path)))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this model ({str(err).splitlines()[0][:300]})") from None


def build_engine(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, grad_clip: float, *, deepspeed=None,
                 batch_size: int = 1) -> Engine:
    """``train.engine`` -> an engine around ``model``; ``deepspeed``: its config section."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine '{name}': choose one of {', '.join(ENGINES)}")
    if name == "deepspeed":
        from trainer.parallel.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, optimizer, scheduler, device, autocast_dtype, grad_clip,
                               deepspeed, batch_size)
    return DDPEngine(model, optimizer, scheduler, device, autocast_dtype, grad_clip)
