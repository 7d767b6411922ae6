"""How the model is replicated, stepped and saved across ranks, behind one interface.

The training loop asks an engine for exactly these: ``forward``, ``backward``,
``accumulating()`` (backwards whose gradients add up before one step), ``step() -> grad
norm``, ``train()`` / ``eval()``, ``gathered()`` (the full module, for a momentum
update or the encoder export, even where parameters are sharded), and ``save(folder)``
/ ``load(folder)``, which every rank calls inside the checkpointer's write-then-rename,
and ``close()`` at the end of a finished run.
The module it trains holds every trained parameter (model and objective parts), and the
losses gather embeddings across ranks themselves (``trainer.parallel.distributed``), so
an engine only replicates, reduces gradients, steps and saves.

Before it is built, an engine class answers for itself what the loop must not guess:
which config it refuses and why (``check``, raising ConfigError; it returns what it leaves
off, one line each), its own config section (``settings``), the weights' memory format,
whether ``train.compile`` may act, whether it needs a process group on one process, and
how a checkpoint it wrote is resumed. Every engine is built from the same arguments
(:meth:`Engine.__init__`).
``trainer.parallel.engines`` holds the registry; ``ddp_engine`` and ``deepspeed_engine``
the two engines.
"""

from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from trainer.safe_files import CheckpointError, durable_write

WEIGHTS = "weights.safetensors"  # the whole model, written by every engine (rank 0)


class Engine(ABC):
    """The interface; subclasses fill it in."""

    name = ""
    needs_process_group = False  # even on one process
    module: nn.Module  # the unwrapped model (under ZeRO-3: placeholders outside forward / gathered)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, *, grad_clip: float = 0.0, batch_size: int = 1,
                 settings=None):
        """``model`` (parameters counted from it, not rebuilt), its ``optimizer`` and LR
        ``scheduler``, the ``device``, the autocast dtype (None: none), gradient clipping
        (0: off), the global batch in clips, and the engine's own config section
        (:meth:`settings`)."""
        self.device, self.autocast_dtype = device, autocast_dtype

    @classmethod
    def settings(cls, cfg):
        """This engine's own section of the pretraining config (None: it has none)."""
        return None

    @classmethod
    def check(cls, cfg, device: torch.device) -> list[str]:
        """Refuse (ConfigError naming the key) what this engine cannot run with ``cfg``;
        return what it leaves off instead, one line each."""
        return []

    @classmethod
    def memory_format(cls, cfg) -> torch.memory_format:
        """The weights' memory format under ``cfg``."""
        return torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    @classmethod
    def compiles(cls, cfg) -> bool:
        """Whether ``train.compile`` may compile the model this engine wraps."""
        return True

    @classmethod
    def resume_hint(cls, saved: dict) -> str:
        """What a checkpoint it wrote (``saved``: its meta.json) holds, and how to resume it."""
        ranks = saved.get("world_size", "?")
        return f"It holds {cls.name} state from {ranks} rank(s): resume it with train.engine={cls.name}"

    def describe(self) -> str:
        """One line: the engine, and how it computes."""
        return f"{self.name}; {'bf16 autocast' if self.autocast_dtype else 'no autocast'}"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def forward(self, *args, **kwargs):
        """The model's outputs for a batch, under the engine's autocast."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (reduced across ranks by the step's last backward)."""

    @abstractmethod
    def accumulating(self):
        """A context: backwards inside add their gradients; the reduction and the update
        wait for a backward outside."""

    @abstractmethod
    def step(self) -> float:
        """Clip, update, step the schedule, clear the gradients; the gradient norm before
        clipping (0 when clipping is off)."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the next step."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write the engine's state (model, optimizer, schedule) into ``folder``; every rank
        calls it."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Read back what :meth:`save` wrote (CheckpointError naming the file when it does
        not fit)."""

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

    def close(self) -> None:
        """Release what the engine holds of the process group's work (hooks, pending
        gathers), at the end of a finished run, while every peer is alive: a gloo work
        object first freed during interpreter exit can abort the process. (Not after a
        failure: collecting work that waits on a lost peer would block.)"""
        gc.collect()


def save_weights(module: nn.Module, folder: Path) -> None:
    """``folder/weights.safetensors``: every parameter and buffer of ``module``, fsynced."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    durable_write(folder / WEIGHTS, lambda f: f.write(save(tensors)))


def load_weights(module: nn.Module, folder: Path) -> None:
    path = folder / WEIGHTS
    try:
        module.load_state_dict(load_file(str(path)))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this model ({str(err).splitlines()[0][:300]})") from None
