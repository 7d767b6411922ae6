"""The exported encoder: ``encoder.safetensors`` (weights) + ``encoder.json`` (all that
rebuilds the encoder and its front end), what pretraining leaves in its run folder and
evaluation, sweeps and the HEAR API read."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dataio.frontend import FrontendConfig
from trainer.models.encoders import build_encoder
from trainer.safe_files import CheckpointError, describe_error, durable_write

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"


def export_encoder(encoder: torch.nn.Module, meta: dict, run_dir: str | Path) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` (all that rebuilds the encoder and
    its front end) into ``run_dir``, each fsynced and renamed into place."""
    run_dir = Path(run_dir)
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    try:
        # through open(), so the file's mode follows the umask (safetensors' own writer
        # creates it 0600, unreadable to another user, a Ray node or docker --user)
        durable_write(run_dir / ENCODER_WEIGHTS, lambda f: f.write(save(weights)))
        durable_write(run_dir / ENCODER_META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"could not export the encoder to {run_dir}: {describe_error(err)}") from None
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


def read_encoder_meta(run_dir: str | Path) -> dict:
    """``run_dir``'s encoder.json (what was exported: architecture, front end, view length)."""
    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / ENCODER_META, run_dir / ENCODER_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no exported encoder ({ENCODER_META} + "
                                f"{ENCODER_WEIGHTS}); has its pretraining finished?")
    try:
        meta = json.loads(meta_path.read_text())
        FrontendConfig(**meta["frontend"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path}: not a valid encoder description ({describe_error(err)})") from None
    return meta


def load_encoder(run_dir: str | Path) -> tuple[torch.nn.Module, FrontendConfig, dict]:
    """The exported encoder of ``run_dir`` (eval mode), its front end and its metadata."""
    meta = read_encoder_meta(run_dir)
    meta_path, weights_path = Path(run_dir) / ENCODER_META, Path(run_dir) / ENCODER_WEIGHTS
    try:
        encoder, frontend = build_from_meta(meta)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path}: not a valid encoder description ({describe_error(err)})") from None
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{weights_path}: unreadable ({describe_error(err)})") from None
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path} does not fit the encoder {meta_path} describes "
                              f"({describe_error(err)})") from None
    return encoder.eval(), frontend, meta
