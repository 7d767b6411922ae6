"""One clip made ready for a shard, in a worker: loaded, mixed down, checked, resampled
and encoded in the clip format (a log-mel computed with the front end). The workers import
this; the main process of ``audioclr shard`` only plans, and never imports torch."""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch
import torchaudio.functional as AF

from dataio.formats.clip import to_pcm16
from dataio.frontend import FrontendConfig, LogMel
from dataio.stop_signal import raise_if_stopping
from dataio.writing.shard_writer import ClipResult, Encoding, Loader, _one_line
from dataio.writing.sources.item import ClipItem


def encode_clip(encoding: Encoding, pcm: np.ndarray, rate: int) -> bytes:
    """``pcm`` (int16 samples at ``rate`` Hz) as the member ``encoding`` says."""
    return encoding.format.encode(pcm, rate, _logmel(encoding.frontend) if encoding.frontend else None)


_LOGMELS: dict = {}


def _logmel(frontend: FrontendConfig) -> LogMel:
    """One LogMel per front end per process (its filter bank is built once)."""
    key = repr(frontend)
    if key not in _LOGMELS:
        if multiprocessing.parent_process() is not None:
            torch.set_num_threads(1)  # in a pool process: the pool is the parallelism
        _LOGMELS[key] = LogMel(frontend)
    return _LOGMELS[key]


def _resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``mono`` [frames] at ``rate`` Hz resampled to ``target`` Hz."""
    if multiprocessing.parent_process() is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # in a pool process: the pool is the parallelism
    return AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate, target).numpy()


def _to_mono(samples: np.ndarray) -> np.ndarray:
    """``[frames]`` or ``[frames, channels]`` -> float32 ``[frames]`` (mean of the channels)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise ValueError(f"loader gave samples of shape {samples.shape}, not [frames, channels]")
    return samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]


def process_clip(item: ClipItem, loader: Loader, sample_rate: int,
                 min_seconds: float, encoding: Encoding = Encoding()) -> ClipResult:
    """Load, mix down, validate, resample to ``sample_rate`` Hz and encode one clip.

    Never raises for bad input: a clip that cannot be used comes back with a reason.
    """
    try:
        samples, rate = loader(item)
        mono, rate = _to_mono(samples), int(rate)
    except FileNotFoundError:
        return ClipResult(reason="missing file")
    except Exception as err:  # noqa: BLE001 - any decoder failure is a rejection, not a crash
        raise_if_stopping()  # unless a stop arrived inside the decoder: the file is not to blame
        return ClipResult(reason=f"unreadable: {_one_line(err)}")
    if mono.size == 0:
        return ClipResult(reason="empty (0 frames)")
    if not np.isfinite(mono).all():
        return ClipResult(reason="non-finite samples (NaN or Inf)")
    if rate <= 0:
        return ClipResult(reason=f"bad sample rate {rate}")
    if mono.size / rate < min_seconds:
        return ClipResult(reason=f"too short: {mono.size / rate:.3f} s < {min_seconds:g} s")
    try:
        if rate != sample_rate:
            mono = _resample(mono, rate, sample_rate)
        return ClipResult(data=encode_clip(encoding, to_pcm16(mono), sample_rate), frames=int(mono.size))
    except Exception as err:  # noqa: BLE001
        raise_if_stopping()
        return ClipResult(reason=f"encode failed: {_one_line(err)}")
