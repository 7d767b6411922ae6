"""How views are drawn from a clip: random crops (padded when the clip is short), and
random gains for the fine-tuning crops.

Crop positions are drawn for a whole batch at once from keyed uniforms
(:func:`keyed_crop_starts`): a clip's crops are a pure function of (seed, epoch, clip
index, pass), whatever rank, worker or batch it lands in, and the draw costs one
vectorised hash per batch instead of a random generator per clip. The same placement
rule (:func:`place_crops`) serves a single clip drawn from a numpy generator
(:func:`crop_starts`, the fine-tuning crops). Units are whatever the clip is counted in:
samples for audio, frames for a stored log-mel.
"""

from __future__ import annotations

import numpy as np

from dataio.augment.keyed import M32, combine, scalar_key

_CROP_SALT = 0x43524F50  # "CROP": the crop draws' own stream of keyed numbers


def place_crops(lengths: np.ndarray, size: int, u: np.ndarray, order: np.ndarray | None = None,
                gap: int = 0, group: int = 0) -> np.ndarray:
    """Start positions [N, count] of ``count`` crops of ``size`` from clips of ``lengths`` [N].

    ``u`` [N, count] uniforms in [0, 1) place the crops: inside the clip when it is long
    enough; for a shorter clip the start is <= 0 (the clip sits at a random offset inside
    a padded view). With ``gap`` > 0 the starts of each ``group`` of consecutive crops (a
    view set) are at least ``gap`` apart where the clip allows (as far apart as it allows
    otherwise), uniform over such placements, in the random order ``order`` [N, count]
    (uniforms) gives.
    """
    lengths = np.asarray(lengths, dtype=np.int64)[:, None]
    count = u.shape[1]
    room = lengths - size
    starts = np.floor(u * (np.maximum(room, 0) + 1)).astype(np.int64)
    group = group or count
    if gap > 0 and group >= 2:
        sets = count // group
        g = np.minimum(gap, np.maximum(room, 0) // (group - 1))  # [N, 1]
        slack = np.maximum(room, 0) - g * (group - 1)
        inside = np.floor(u * (slack + 1)).astype(np.int64).reshape(-1, sets, group)
        inside = np.sort(inside, axis=2) + g[:, :, None] * np.arange(group)
        rank = np.argsort(order.reshape(-1, sets, group), axis=2)  # a random order of each set
        starts = np.take_along_axis(inside, rank, axis=2).reshape(-1, count)
    short = -np.floor(u * (np.maximum(-room, 0) + 1)).astype(np.int64)
    return np.where(room < 0, short, starts)


def keyed_uniforms(keys: np.ndarray, count: int) -> np.ndarray:
    """[N, count] float64 uniforms in [0, 1) (24-bit resolution) from int64 ``keys`` [N]."""
    k = combine(keys[:, None], _CROP_SALT)
    return (combine(k, np.arange(count, dtype=np.int64)[None, :]) >> 8) / float(1 << 24)


def crop_keys(seed: int, epoch: int, indices: np.ndarray, passes: np.ndarray) -> np.ndarray:
    """One int64 key per clip from (seed, epoch, clip index, pass)."""
    base = np.full(len(indices), scalar_key(seed, epoch), dtype=np.int64)
    return combine(combine(base, np.asarray(indices, np.int64) & M32), np.asarray(passes, np.int64) & M32)


def keyed_crop_starts(lengths: np.ndarray, size: int, count: int, keys: np.ndarray, gap: int = 0,
                      group: int = 0) -> np.ndarray:
    """:func:`place_crops` for a batch of clips, drawn from their keys (:func:`crop_keys`)."""
    u = keyed_uniforms(keys, 2 * count)
    return place_crops(lengths, size, u[:, :count], u[:, count:], gap=gap, group=group)


def crop_starts(num_samples: int, length: int, count: int, rng: np.random.Generator, gap: int = 0) -> list[int]:
    """Start samples of ``count`` random ``length``-sample crops of one clip, drawn from
    ``rng`` (see :func:`place_crops`)."""
    u, order = rng.random((1, count)), rng.random((1, count))
    return [int(s) for s in place_crops(np.array([num_samples]), length, u, order, gap=gap)[0]]


def random_gains(count: int, gain_db: float, rng: np.random.Generator) -> np.ndarray:
    """Linear gains uniform in +-``gain_db`` dB, [count, 1] (ones when gain_db is 0)."""
    if gain_db <= 0:
        return np.ones((count, 1))
    return 10.0 ** (rng.uniform(-gain_db, gain_db, size=(count, 1)) / 20.0)


def patch_starts(num_samples: int, patch: int, hop: int) -> list[int]:
    """Start samples of evaluation patches covering a clip of ``num_samples``
    (at least one patch; the last one aligned to the clip's end)."""
    if num_samples <= patch:
        return [0]
    starts = list(range(0, num_samples - patch + 1, hop))
    if starts[-1] + patch < num_samples:
        starts.append(num_samples - patch)
    return starts
