"""How views are drawn from a clip: random crops (zero-padded when the clip is short),
and random gains for the fine-tuning crops."""

from __future__ import annotations

import numpy as np
import soundfile as sf


def crop_starts(num_samples: int, length: int, count: int, rng: np.random.Generator, gap: int = 0) -> list[int]:
    """Start samples of ``count`` random ``length``-sample crops of a ``num_samples`` clip.

    Inside the clip when it is long enough; for a shorter clip the start is <= 0: the
    clip then sits at a random offset inside a zero-padded view. With ``gap`` > 0 the
    starts are at least ``gap`` samples apart where the clip allows it (uniform over such
    placements, in a random order), and as far apart as it allows otherwise.
    """
    if num_samples < length:
        return [-int(s) for s in rng.integers(0, length - num_samples + 1, size=count)]
    room = num_samples - length
    if gap <= 0 or count < 2:
        return [int(s) for s in rng.integers(0, room + 1, size=count)]
    gap = min(gap, room // (count - 1))
    slack = room - gap * (count - 1)
    starts = np.sort(rng.integers(0, slack + 1, size=count)) + gap * np.arange(count)
    return [int(s) for s in rng.permutation(starts)]


def random_gains(count: int, gain_db: float, rng: np.random.Generator) -> np.ndarray:
    """Linear gains uniform in +-``gain_db`` dB, [count, 1] (ones when gain_db is 0)."""
    if gain_db <= 0:
        return np.ones((count, 1))
    return 10.0 ** (rng.uniform(-gain_db, gain_db, size=(count, 1)) / 20.0)


def read_views(source: sf.SoundFile, count: int, length: int, rng: np.random.Generator, gap: int = 0,
               group: int = 0) -> np.ndarray:
    """``count`` random crops read straight from an open audio file: only the frames the
    views need are decoded (a long clip pays for its views, not for its whole length).
    With ``gap``, the starts of each ``group`` of consecutive crops (a view set) are at
    least ``gap`` samples apart where the clip allows. Mono float32 [count, length]; the
    channels are averaged."""
    views = np.zeros((count, length), dtype=np.float32)
    group = group or count
    starts = [s for _ in range(count // group) for s in crop_starts(source.frames, length, group, rng, gap)]
    for i, start in enumerate(starts):
        source.seek(max(start, 0))
        part = source.read(min(length, source.frames), dtype="float32", always_2d=True).mean(axis=1)
        offset = max(-start, 0)
        views[i, offset:offset + len(part)] = part
    return views


def patch_starts(num_samples: int, patch: int, hop: int) -> list[int]:
    """Start samples of evaluation patches covering a clip of ``num_samples``
    (at least one patch; the last one aligned to the clip's end)."""
    if num_samples <= patch:
        return [0]
    starts = list(range(0, num_samples - patch + 1, hop))
    if starts[-1] + patch < num_samples:
        starts.append(num_samples - patch)
    return starts
