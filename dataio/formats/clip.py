"""A member opened: the crops a batch needs cut straight from it (:class:`Clip`), and the
conversion every wave format writes from (:func:`to_pcm16`)."""

from __future__ import annotations

import numpy as np


def to_pcm16(mono: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 (clipped, rounded): what 16-bit FLAC keeps."""
    return np.clip(np.rint(np.clip(mono, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)


def cut(clip: np.ndarray, starts, size: int, fill=0, out: np.ndarray | None = None) -> np.ndarray:
    """Crops ``[len(starts), size, *clip.shape[1:]]`` of ``clip`` (time on axis 0) at
    ``starts``, written into ``out`` when given; a start < 0 or a crop past the end is
    padded with ``fill``."""
    if out is None:
        out = np.empty((len(starts), size, *clip.shape[1:]), dtype=clip.dtype)
    for i, start in enumerate(starts):
        start = int(start)
        if 0 <= start <= len(clip) - size:  # the usual case: the crop inside the clip
            out[i] = clip[start:start + size]
            continue
        lo = max(start, 0)
        part = clip[lo:start + size]
        out[i].fill(fill)
        out[i, lo - start:lo - start + len(part)] = part
    return out


class Clip:
    """One member held in memory: its ``length`` (samples, or frames for a log-mel) and
    ``cut(starts, size[, out])``, the crops at ``starts`` (``[n, size]`` samples, or
    ``[n, size, F]`` frames), padded with ``fill`` where a crop leaves the clip."""

    def __init__(self, data: np.ndarray, fill=0):
        self.data, self.fill, self.length = data, fill, len(data)

    def cut(self, starts, size: int, out: np.ndarray | None = None) -> np.ndarray:
        return cut(self.data, starts, size, self.fill, out)

    def whole(self) -> np.ndarray:
        return self.data


def samples_of(data, dtype: str, name: str) -> Clip:
    """A headerless member of ``dtype`` samples (``"<i2"``, ``"<f2"``) as a :class:`Clip`;
    ValueError unless it holds a positive whole number of them."""
    width = np.dtype(dtype).itemsize
    if len(data) % width or not len(data):
        raise ValueError(f"{name} member of {len(data)} bytes: {8 * width}-bit samples need a positive byte count "
                         f"divisible by {width}" if width != 2 else f"{name} member of {len(data)} bytes: 16-bit "
                         f"samples need a positive, even byte count")
    return Clip(np.frombuffer(data, dtype=dtype))
