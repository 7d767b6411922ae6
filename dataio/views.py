"""How views are drawn from a decoded clip: random crops with a random gain."""

from __future__ import annotations

import numpy as np


def random_crop(wave: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``length``-sample window of a mono ``wave`` [S]; shorter clips are
    zero-padded at a random offset so every view has the same length."""
    n = wave.shape[-1]
    if n >= length:
        start = int(rng.integers(0, n - length + 1))
        return wave[start:start + length]
    out = np.zeros(length, dtype=np.float32)
    start = int(rng.integers(0, length - n + 1))
    out[start:start + n] = wave
    return out


def draw_views(wave: np.ndarray, num_views: int, length: int, gain_db: float,
               rng: np.random.Generator) -> np.ndarray:
    """``num_views`` independent crops of ``wave`` [S] -> float32 [num_views, length],
    each scaled by a gain drawn uniformly in +-``gain_db`` dB."""
    views = np.stack([random_crop(wave, length, rng) for _ in range(num_views)])
    if gain_db > 0:
        gains = 10.0 ** (rng.uniform(-gain_db, gain_db, size=(num_views, 1)) / 20.0)
        views = views * gains
    return views.astype(np.float32, copy=False)


def patch_starts(num_samples: int, patch: int, hop: int) -> list[int]:
    """Start samples of evaluation patches covering a clip of ``num_samples``
    (at least one patch; the last one aligned to the clip's end)."""
    if num_samples <= patch:
        return [0]
    starts = list(range(0, num_samples - patch + 1, hop))
    if starts[-1] + patch < num_samples:
        starts.append(num_samples - patch)
    return starts
