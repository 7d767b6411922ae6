"""Atomic checkpoints, resume, and the exported encoder.

A checkpoint is a folder ``run_dir/checkpoints/step_XXXXXXXX/`` holding ``state.pt``
(everything every rank shares: model, optimizer, scheduler, objective state, step, data
position) and ``rank_XXXXX.pt`` (each rank's RNG states). It is assembled under
``step_XXXXXXXX.tmp`` and renamed when complete, so a killed run never leaves a
half-written checkpoint where ``resume=auto`` would find it. The run directory must be
on storage every node sees.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dataio.frontend import FrontendConfig
from trainer import distributed
from trainer.encoders import build_encoder

log = logging.getLogger(__name__)

STATE = "state.pt"
ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Writes, finds and reads the checkpoints of one run (every rank calls ``save``)."""

    def __init__(self, run_dir: str | Path, keep_last: int, info: distributed.DistInfo):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.info = info

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if p.is_dir() and p.suffix != ".tmp"
                      and (p / STATE).is_file())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def save(self, step: int, shared: dict, per_rank: dict) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.info.is_main and tmp.exists():
            shutil.rmtree(tmp)
        distributed.barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(per_rank, tmp / f"rank_{self.info.rank:05d}.pt")
        distributed.barrier()
        if self.info.is_main:
            _atomic_torch_save(shared, tmp / STATE)
            (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": self.info.world_size}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def load(self, folder: str | Path) -> tuple[dict, dict | None]:
        """(shared state, this rank's state or None when the run had fewer ranks)."""
        folder = Path(folder)
        if not (folder / STATE).is_file():
            raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {STATE})")
        shared = torch.load(folder / STATE, map_location="cpu", weights_only=False)
        mine = folder / f"rank_{self.info.rank:05d}.pt"
        per_rank = torch.load(mine, map_location="cpu", weights_only=False) if mine.is_file() else None
        return shared, per_rank


def export_encoder(encoder: torch.nn.Module, meta: dict, run_dir: str | Path) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` (all that rebuilds the encoder and
    its front end) into ``run_dir``, each atomically."""
    run_dir = Path(run_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = run_dir / (ENCODER_WEIGHTS + ".tmp")
    save_file(weights, str(tmp))
    tmp.replace(run_dir / ENCODER_WEIGHTS)
    tmp = run_dir / (ENCODER_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(run_dir / ENCODER_META)
    return run_dir / ENCODER_WEIGHTS


def encoder_meta(name: str, width: int, frontend: FrontendConfig, embedding_dim: int,
                 step: int, view_seconds: float) -> dict:
    return {"format": 1, "encoder": name, "width": width, "in_channels": frontend.channels,
            "embedding_dim": embedding_dim, "frontend": asdict(frontend),
            "view_seconds": view_seconds, "step": step}


def build_from_meta(meta: dict) -> tuple[torch.nn.Module, FrontendConfig]:
    """A freshly initialised encoder of the exported architecture, and its front end."""
    encoder = build_encoder(meta["encoder"], in_channels=meta["in_channels"], width=meta["width"])
    return encoder, FrontendConfig(**meta["frontend"])


def load_encoder(run_dir: str | Path) -> tuple[torch.nn.Module, FrontendConfig, dict]:
    """The exported encoder of ``run_dir`` (eval mode), its front end and its metadata."""
    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / ENCODER_META, run_dir / ENCODER_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no exported encoder ({ENCODER_META} + "
                                f"{ENCODER_WEIGHTS}); has its pretraining finished?")
    meta = json.loads(meta_path.read_text())
    encoder, frontend = build_from_meta(meta)
    encoder.load_state_dict(load_file(str(weights_path)))
    return encoder.eval(), frontend, meta
