"""Frozen-encoder embeddings of a clip set: every clip cut into patches.

The patch embeddings are held once: unit vectors, clip means and standardised features
are computed from them a block at a time, never as a second [P, D] array.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dataio.backends.views import patch_starts
from dataio.frontend import FrontendConfig, LogMel
from trainer.evaluate.clips import ClipSet

BLOCK = 65536  # rows per block when a pass over the embeddings derives something from them


@dataclass
class ClipEmbeddings:
    """patches: [P_total, D] float32 patch embeddings; owner: [P_total] clip row of each
    patch, non-decreasing (a clip's patches are contiguous, clips in row order)."""

    patches: np.ndarray
    owner: np.ndarray
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.owner) > 1 and (np.diff(self.owner) < 0).any():
            raise ValueError("patch embeddings must come in clip order (owner non-decreasing)")

    @property
    def num_clips(self) -> int:
        return int(self.owner.max()) + 1 if len(self.owner) else 0

    def norms(self) -> np.ndarray:
        """[P_total] float32 L2 norm of each patch embedding, 1 where it is 0 (computed once)."""
        if "norms" not in self._cache:
            norms = np.empty(len(self.patches), np.float32)
            for lo in range(0, len(self.patches), BLOCK):
                norms[lo:lo + BLOCK] = np.linalg.norm(self.patches[lo:lo + BLOCK], axis=1)
            self._cache["norms"] = np.where(norms > 0, norms, np.float32(1))  # any scale: 1e-13 is not zero
        return self._cache["norms"]

    def unit_rows(self, index: np.ndarray | None = None) -> Rows:
        """The L2-normalised patch embeddings of patches ``index`` (all when None), as a
        lazy [len(index), D] array read a block at a time."""
        return Rows(self.patches, np.arange(len(self.patches)) if index is None else index, self.norms())

    def clip_means(self) -> np.ndarray:
        """[N, D] float32: the mean of each clip's L2-normalised patch embeddings,
        renormalised (computed once, a block of clips at a time, in float64)."""
        if "means" not in self._cache:
            n, dim = self.num_clips, self.patches.shape[1]
            means = np.zeros((n, dim), dtype=np.float32)
            bounds = np.searchsorted(self.owner, np.arange(n + 1))  # clip c: patches bounds[c]..bounds[c+1]
            clips_per_block = max(1, BLOCK * n // max(len(self.owner), 1))
            for c0 in range(0, n, clips_per_block):
                c1 = min(n, c0 + clips_per_block)
                lo, hi = bounds[c0], bounds[c1]
                unit = self.patches[lo:hi] / self.norms()[lo:hi, None]
                sums = np.zeros((c1 - c0, dim), dtype=np.float64)
                np.add.at(sums, self.owner[lo:hi] - c0, unit)
                means[c0:c1] = sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)
            self._cache["means"] = means
        return self._cache["means"]


@dataclass
class Rows:
    """A lazy [len(index), D] array: rows ``index`` of ``data``, each divided by its
    entry of ``norms`` when given; slicing (``rows[lo:hi]``) materialises only that block."""

    data: np.ndarray
    index: np.ndarray
    norms: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, part: slice) -> np.ndarray:
        rows = self.index[part]
        return self.data[rows] if self.norms is None else self.data[rows] / self.norms[rows, None]


def clip_patches(clips: ClipSet, rows, patch: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(row, mono patch [patch]) for every patch of every clip in ``rows`` (in increasing
    row order, each clip decoded as it is reached); a clip shorter than a patch is
    zero-padded into one."""
    for row, wave in clips.waves(rows):
        if len(wave) < patch:
            wave = np.pad(wave, (0, patch - len(wave)))
        for start in patch_starts(len(wave), patch, hop):
            yield row, wave[start:start + patch]


def patch_batches(clips: ClipSet, rows, patch: int, hop: int, batch_size: int):
    """Batches of (owner rows [n], waves [n, patch]) over :func:`clip_patches`."""
    owners, waves = [], []
    for row, wave in clip_patches(clips, rows, patch, hop):
        owners.append(row)
        waves.append(wave)
        if len(waves) == batch_size:
            yield np.asarray(owners), np.stack(waves)
            owners, waves = [], []
    if waves:
        yield np.asarray(owners), np.stack(waves)


class _Filled:
    """Rows appended in batches into blocks of ``BLOCK`` rows made with ``np.empty``: the
    untouched end of a block is never resident, and a block is one allocation of its own
    (given back whole when freed), not thousands of batch-sized pieces of the heap."""

    def __init__(self, shape: tuple, dtype):
        self.shape, self.dtype, self.blocks, self.used = shape, dtype, [], BLOCK

    def add(self, x: np.ndarray) -> None:
        while len(x):
            if self.used == BLOCK:
                self.blocks.append(np.empty((BLOCK, *self.shape), self.dtype))
                self.used = 0
            n = min(len(x), BLOCK - self.used)
            self.blocks[-1][self.used:self.used + n] = x[:n]
            self.used, x = self.used + n, x[n:]

    def result(self) -> np.ndarray:
        """One array of every row added (a view of the only block, or the blocks joined)."""
        if not self.blocks:
            return np.zeros((0, *self.shape), self.dtype)
        self.blocks[-1] = self.blocks[-1][:self.used]
        return self.blocks[0] if len(self.blocks) == 1 else np.concatenate(self.blocks)


@torch.no_grad()
def embed_clips(encoder: torch.nn.Module, frontend: FrontendConfig, clips: ClipSet, *,
                patch_seconds: float, hop_seconds: float, batch_size: int,
                device: torch.device, rows=None) -> ClipEmbeddings:
    """Embed every patch (``patch_seconds`` long, every ``hop_seconds``) of every clip (of
    the clips ``rows`` when given), clips in increasing row order, each decoded when it is
    reached."""
    encoder = encoder.to(device).eval()
    logmel = LogMel(frontend).to(device)
    patch = int(patch_seconds * clips.sample_rate)
    hop = max(1, int(hop_seconds * clips.sample_rate))
    dtype = next(encoder.parameters()).dtype  # bf16 weights (DeepSpeed's bf16) take bf16 log-mels
    out, owner = _Filled((encoder.embedding_dim,), np.float32), _Filled((), np.int64)
    for owners, waves in patch_batches(clips, range(len(clips)) if rows is None else rows, patch, hop, batch_size):
        out.add(encoder(logmel(torch.from_numpy(waves).to(device)).to(dtype)).float().cpu().numpy())
        owner.add(owners)
    return ClipEmbeddings(out.result(), owner.result())
