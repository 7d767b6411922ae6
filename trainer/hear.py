"""The HEAR 2021 API over an audioclr encoder (hear-eval-kit calls these three functions).

    import trainer.hear as hear
    model = hear.load_model("runs/demo/run")                  # a run folder (its exported encoder)
    scene = hear.get_scene_embeddings(audio, model)           # audio: [n_sounds, n_samples] at model.sample_rate
    emb, ms = hear.get_timestamp_embeddings(audio, model)     # [n_sounds, T, D], [n_sounds, T] in milliseconds

Timestamp embeddings are the encoder's embedding of a window of the length it was trained
on (``view_seconds``), centred on every ``hop_ms`` (50 ms) from 0 to the end of the sound
(the sound is zero-padded by half a window at both ends); the scene embedding is their
mean. Windows run through the encoder ``batch_size`` at a time, on the model's device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dataio.frontend import LogMel
from trainer.checkpoint import load_encoder

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


class HearModel(torch.nn.Module):
    """An exported audioclr encoder with its log-mel front end, as HEAR expects a model:
    ``sample_rate``, ``scene_embedding_size``, ``timestamp_embedding_size``."""

    def __init__(self, encoder: torch.nn.Module, logmel: LogMel, embedding_dim: int, view_seconds: float,
                 hop_ms: float, batch_size: int):
        super().__init__()
        self.encoder, self.logmel = encoder.eval(), logmel
        self.sample_rate = logmel.cfg.sample_rate
        self.scene_embedding_size = self.timestamp_embedding_size = int(embedding_dim)
        self.window = max(1, int(round(view_seconds * self.sample_rate)))
        self.hop = max(1, int(round(hop_ms / 1000 * self.sample_rate)))
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device


def load_model(model_file_path: str = "", *, hop_ms: float = 50.0, batch_size: int = 256,
               device: str | None = None) -> HearModel:
    """The encoder a run folder exported (``encoder.json`` + ``encoder.safetensors``), on
    ``device`` (default: a GPU when there is one)."""
    if not model_file_path:
        raise ValueError("load_model: give the run folder of an audioclr encoder (it holds encoder.json and "
                         "encoder.safetensors)")
    path = Path(model_file_path)
    folder = path.parent if path.is_file() else path
    encoder, frontend, meta = load_encoder(folder)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = HearModel(encoder, LogMel(frontend), meta["embedding_dim"], meta["view_seconds"], hop_ms, batch_size)
    return model.to(target).eval()


def _check(audio, model: HearModel, sample_rate: int | None) -> torch.Tensor:
    if not isinstance(audio, torch.Tensor):
        raise ValueError(f"audio: expected a torch.Tensor [n_sounds, n_samples], got {type(audio).__name__}")
    if audio.dim() != 2:
        raise ValueError(f"audio: expected a 2-D tensor [n_sounds, n_samples], got {audio.dim()}-D "
                         f"{tuple(audio.shape)}")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"audio: an empty batch {tuple(audio.shape)}: give at least one sound of one sample")
    if not audio.is_floating_point():
        raise ValueError(f"audio: expected float samples in [-1, 1], got {audio.dtype}")
    if sample_rate is not None and sample_rate != model.sample_rate:
        raise ValueError(f"audio at {sample_rate} Hz: this model takes {model.sample_rate} Hz; resample first")
    return audio.to(model.device, torch.float32)


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel,
                             sample_rate: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_sounds, T, D] embeddings, [n_sounds, T] their centres in milliseconds), T =
    n_samples // hop + 1. ``sample_rate``, when given, must be the model's."""
    audio = _check(audio, model, sample_rate)
    half = model.window // 2
    padded = F.pad(audio, (half, model.window - half))
    count = audio.shape[1] // model.hop + 1
    out = []
    for sound in padded:
        windows = sound.unfold(0, model.window, model.hop)[:count]  # a view: no copy of every window
        parts = [model.encoder(model.logmel(windows[i:i + model.batch_size].contiguous())).float()
                 for i in range(0, count, model.batch_size)]
        out.append(torch.cat(parts))
    stamps = torch.arange(count, device=model.device, dtype=torch.float32) * (1000.0 * model.hop / model.sample_rate)
    return torch.stack(out), stamps.expand(audio.shape[0], count).contiguous()


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: HearModel, sample_rate: int | None = None) -> torch.Tensor:
    """[n_sounds, D]: the mean of each sound's timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model, sample_rate)
    return embeddings.mean(dim=1)
