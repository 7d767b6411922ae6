"""The registry of engines (``train.engine``): each engine's config check and its
construction, in one place."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.parallel.ddp_engine import DDPEngine
from trainer.parallel.deepspeed_engine import DeepSpeedEngine  # DeepSpeed itself is imported when one is built
from trainer.parallel.engine import Engine

ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}


def engine_class(name: str) -> type[Engine]:
    return ENGINES[name]


def build_engine(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, grad_clip: float, *, settings=None,
                 batch_size: int = 1) -> Engine:
    """``train.engine`` -> an engine around ``model``; ``settings``: the engine's own config
    section (``engine_class(name).settings(cfg)``)."""
    return ENGINES[name](model, optimizer, scheduler, device, autocast_dtype, grad_clip=grad_clip,
                         batch_size=batch_size, settings=settings)


def how_to_resume(saved: dict, folder: Path) -> str:
    """What a checkpoint holds (``saved``: its meta.json), and how to go on from it."""
    held = ENGINES.get(saved.get("engine", "ddp"), DDPEngine).resume_hint(saved)
    return (f"{held}. The optimizer state does not convert between engines or ZeRO partitions; to go on "
            f"otherwise, start a new run from its weights with model.pretrained={folder} (a new run_dir)")
