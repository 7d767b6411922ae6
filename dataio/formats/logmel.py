"""``logmel`` (``KEY.mel``): the clip's log-mel in dB as float16 frames ``[T, F]``
(frame-major, so a view is a contiguous byte range), computed once with the front end the
manifest records. No waveform op can run on it (the chain's gain, reverse and polarity
take their log-mel forms); normalisation is applied at train time, so
``frontend.norm_mean``/``norm_std`` stay free."""

from __future__ import annotations

import numpy as np

from dataio.errors import ConfigError
from dataio.formats.base import PCM_SCALE, ClipFormat
from dataio.formats.clip import Clip

# the front-end keys a stored log-mel depends on (normalisation and channels are applied later)
STORED_FRONTEND = ("sample_rate", "win_ms", "hop_ms", "n_fft", "window", "n_mels", "f_min", "f_max", "mel_scale",
                   "log_floor")


def frontend_record(frontend) -> dict:
    """The front end (a ``FrontendConfig``) a log-mel is computed with, as the manifest
    records it (FFT size and top band edge resolved, so equal features compare equal)."""
    record = {key: getattr(frontend, key) for key in STORED_FRONTEND}
    record["n_fft"] = frontend.fft_size
    record["f_max"] = float(frontend.f_max or frontend.sample_rate / 2)
    return record


def stored_frontend(record: dict):
    """The ``FrontendConfig`` of a manifest's frontend record."""
    from dataio.frontend import FrontendConfig  # deferred: the front end brings torch

    return FrontendConfig(**{key: record[key] for key in STORED_FRONTEND})


def frontend_differences(frontend, record: dict) -> list[str]:
    """``frontend.KEY: the recipe has A, the corpus B`` for each key where ``frontend``
    would compute other features than a corpus computed with ``record``."""
    mine = frontend_record(frontend)
    return [f"frontend.{key}: the recipe has {mine[key]!r}, the corpus {record.get(key)!r}"
            for key in STORED_FRONTEND if mine[key] != record.get(key)]


def logmel_frames(pcm: np.ndarray, frontend, logmel=None) -> np.ndarray:
    """float16 dB frames ``[T, F]`` of int16 samples ``pcm`` [S] (T = S // hop + 1); a clip
    shorter than half an FFT is zero-padded to it first (the centred frames reflect it)."""
    import torch  # deferred: only what computes log-mels needs it

    from dataio.frontend import LogMel

    logmel = logmel or LogMel(frontend)
    wave = torch.from_numpy(pcm.astype(np.float32) * np.float32(PCM_SCALE))
    frames = frontend.num_frames(len(wave))
    if len(wave) <= frontend.fft_size // 2:
        wave = torch.nn.functional.pad(wave, (0, frontend.fft_size // 2 + 1 - len(wave)))
    return logmel.db(wave[None])[0, :, :frames].T.numpy().astype(np.float16)


class Logmel(ClipFormat):
    name, ext = "logmel", "mel"
    summary = ("float16 log-mel frames of --config's front end: no decoder and no log-mel at train time, but no "
               "waveform augmentation either")
    domain = "mel"
    dtype = np.dtype(np.float16)
    dali_type = "FLOAT16"

    def encode(self, pcm: np.ndarray, rate: int, logmel=None) -> bytes:
        if logmel is None:
            raise ValueError("a logmel member is computed with a front end: none given")
        return logmel_frames(pcm, logmel.cfg, logmel).tobytes()

    def manifest_problem(self, record: dict) -> str | None:
        missing = [k for k in STORED_FRONTEND if k not in record]
        return f"a logmel corpus must record its front end; 'frontend' lacks {', '.join(missing)}" if missing else None

    def check_frontend(self, frontend, manifest) -> None:
        wrong = frontend_differences(frontend, manifest.frontend)
        if wrong:
            raise ConfigError(f"{manifest.where} is a logmel corpus computed with another front end than the "
                              f"recipe's: {'; '.join(wrong)}. Set the recipe's frontend to the corpus's, or "
                              f"convert a flac or pcm16 corpus with this front end (`audioclr shard convert`)")

    def open(self, data, codec) -> Clip:
        row = 2 * codec.n_mels
        if len(data) % row or not len(data):
            raise ValueError(f"logmel member of {len(data)} bytes: not a whole number of {codec.n_mels}-band "
                             f"float16 frames ({row} bytes each)")
        return Clip(np.frombuffer(data, dtype="<f2").reshape(-1, codec.n_mels), fill=np.float16(codec.floor_db))

    def dali_clip(self, member, codec):
        from nvidia.dali import fn  # deferred: DALI is heavy and optional

        return fn.reshape(member, shape=[-1, codec.n_mels])

    def dali_float(self, view, frontend):
        from nvidia.dali import fn, types  # deferred: DALI is heavy and optional

        return fn.transpose(frontend.normalise(fn.cast(view, dtype=types.FLOAT)), perm=[1, 0])
