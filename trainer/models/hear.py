"""The HEAR 2021 API over an audioclr encoder (hear-eval-kit calls these three functions).

    import trainer.models.hear as hear
    model = hear.load_model("runs/demo/run")                  # a run folder (its exported encoder)
    scene = hear.get_scene_embeddings(audio, model)           # audio: [n_sounds, n_samples] at model.sample_rate
    emb, ms = hear.get_timestamp_embeddings(audio, model)     # [n_sounds, T, D], [n_sounds, T] in milliseconds

Timestamp embeddings are the encoder's embedding of a window of the length it was trained
on (``view_seconds``), centred on every ``hop_ms`` (50 ms) from 0 to the end of the sound
(the sound is zero-padded by half a window at both ends). The scene embedding is the mean
of the same windows taken on a coarser grid, every ``scene_hop_ms`` (250 ms, see
``SCENE_HOP_MS``). The windows of all sounds of a call go through the encoder together,
``batch_size`` at a time, on the model's device: a call costs ceil(windows / batch_size)
encoder passes, and memory holds one chunk of windows, not every window of every sound.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dataio.frontend import LogMel
from trainer.models.export import load_encoder

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings",
           "TIMESTAMP_HOP_MS", "SCENE_HOP_MS"]

TIMESTAMP_HOP_MS = 50.0
"""Hop of the timestamp embeddings: the grid HEAR's event-detection tasks score onsets on."""

SCENE_HOP_MS = 250.0
"""Hop of the windows whose mean is the scene embedding. Neighbouring windows 50 ms apart
see nearly the same audio, so a 50-ms grid costs 20 encoder passes per second of sound for
little change in a mean. At 250 ms each sample still lies in two or more windows for any
training view of 0.5 s or longer (four for a 1-s view), so no stretch of the sound weighs
on the mean through a single window's edge, while a 4-s clip takes 17 windows instead of
81 (about 5x less compute). Non-overlapping windows would be cheaper still, but would
make the mean depend on where the grid happens to cut each event."""


class HearModel(torch.nn.Module):
    """An exported audioclr encoder with its log-mel front end, as HEAR expects a model:
    ``sample_rate``, ``scene_embedding_size``, ``timestamp_embedding_size``. ``window``,
    ``hop`` and ``scene_hop`` are in samples."""

    def __init__(self, encoder: torch.nn.Module, logmel: LogMel, embedding_dim: int, view_seconds: float,
                 hop_ms: float, batch_size: int, scene_hop_ms: float = SCENE_HOP_MS):
        super().__init__()
        self.encoder, self.logmel = encoder.eval(), logmel
        self.sample_rate = logmel.cfg.sample_rate
        self.scene_embedding_size = self.timestamp_embedding_size = int(embedding_dim)
        self.window = max(1, int(round(view_seconds * self.sample_rate)))
        self.hop = max(1, int(round(hop_ms / 1000 * self.sample_rate)))
        self.scene_hop = max(1, int(round(scene_hop_ms / 1000 * self.sample_rate)))
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device


def load_model(model_file_path: str = "", *, hop_ms: float = TIMESTAMP_HOP_MS, scene_hop_ms: float = SCENE_HOP_MS,
               batch_size: int = 256, device: str | None = None) -> HearModel:
    """The encoder a run folder exported (``encoder.json`` + ``encoder.safetensors``), on
    ``device`` (default: a GPU when there is one). ``hop_ms`` spaces the timestamp
    embeddings, ``scene_hop_ms`` the windows averaged into a scene embedding; ``batch_size``
    windows go through the encoder at a time."""
    if not model_file_path:
        raise ValueError("load_model: give the run folder of an audioclr encoder (it holds encoder.json and "
                         "encoder.safetensors)")
    path = Path(model_file_path)
    folder = path.parent if path.is_file() else path
    encoder, frontend, meta = load_encoder(folder)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = HearModel(encoder, LogMel(frontend), meta["embedding_dim"], meta["view_seconds"], hop_ms, batch_size,
                      scene_hop_ms)
    return model.to(target).eval()


def _check_finite(audio: torch.Tensor) -> None:
    """A ValueError naming the first sound that holds NaN or Inf samples (they would turn
    every window that touches them, and so the scene embedding, into NaN)."""
    if bool(torch.isfinite(audio).all()):
        return
    nans, infs = audio.isnan().sum(dim=1), audio.isinf().sum(dim=1)
    bad = (nans + infs).nonzero().flatten().tolist()
    first = bad[0]
    what = " and ".join(f"{int(n)} {name}" for n, name in ((nans[first], "NaN"), (infs[first], "Inf")) if n)
    others = f"; sounds {bad[1:]} also hold NaN or Inf" if len(bad) > 1 else ""
    raise ValueError(f"audio: sound {first} of the batch holds {what} samples (of {audio.shape[1]}){others}; "
                     f"clean or drop it before embedding")


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
    _check_finite(audio)
    return audio.to(model.device, torch.float32)


def _window_embeddings(audio: torch.Tensor, model: HearModel, hop: int) -> torch.Tensor:
    """Checked ``audio`` [N, S] -> [N, S // hop + 1, D]: the embedding of the window centred
    on every ``hop`` samples. The windows of all sounds run through the encoder in chunks of
    ``model.batch_size``, a chunk free to span sounds; only a chunk's windows are copied."""
    half = model.window // 2
    padded = F.pad(audio, (half, model.window - half))
    n_sounds, count = audio.shape[0], audio.shape[1] // hop + 1
    windows = padded.unfold(1, model.window, hop)[:, :count]  # [N, count, window], a view
    total = n_sounds * count
    parts = []
    for start in range(0, total, model.batch_size):
        index = torch.arange(start, min(start + model.batch_size, total), device=audio.device)
        chunk = windows[index // count, index % count]  # [b, window], a copy of this chunk only
        parts.append(model.encoder(model.logmel(chunk)).float())
    return torch.cat(parts).reshape(n_sounds, count, -1)


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel,
                             sample_rate: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([n_sounds, T, D] embeddings, [n_sounds, T] their centres in milliseconds), T =
    n_samples // hop + 1 (a 50-ms hop by default). ``sample_rate``, when given, must be the
    model's; a sound holding NaN or Inf raises a ValueError naming it."""
    audio = _check(audio, model, sample_rate)
    embeddings = _window_embeddings(audio, model, model.hop)
    count = embeddings.shape[1]
    stamps = torch.arange(count, device=model.device, dtype=torch.float32) * (1000.0 * model.hop / model.sample_rate)
    return embeddings, stamps.expand(audio.shape[0], count).contiguous()


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: HearModel, sample_rate: int | None = None) -> torch.Tensor:
    """[n_sounds, D]: the mean of each sound's window embeddings on the ``scene_hop`` grid
    (``SCENE_HOP_MS``), i.e. the timestamp embeddings' mean had they been taken that often."""
    audio = _check(audio, model, sample_rate)
    return _window_embeddings(audio, model, model.scene_hop).mean(dim=1)
