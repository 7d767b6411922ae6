"""Frozen-encoder embeddings of a clip set: every clip cut into patches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dataio.frontend import FrontendConfig, LogMel
from dataio.views import patch_starts
from trainer.evaluate.clips import ClipSet


@dataclass
class ClipEmbeddings:
    """patches: [P_total, D] float32 patch embeddings; owner: [P_total] clip row of each patch."""

    patches: np.ndarray
    owner: np.ndarray
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_clips(self) -> int:
        return int(self.owner.max()) + 1 if len(self.owner) else 0

    def unit_patches(self) -> np.ndarray:
        """[P_total, D] L2-normalised patch embeddings (computed once: every round shares them)."""
        if "unit" not in self._cache:
            norm = np.linalg.norm(self.patches, axis=1, keepdims=True)
            self._cache["unit"] = self.patches / np.where(norm > 0, norm, 1.0)  # any scale: 1e-13 is not zero
        return self._cache["unit"]

    def clip_means(self) -> np.ndarray:
        """[N, D]: the mean of each clip's L2-normalised patch embeddings, renormalised
        (computed once)."""
        if "means" not in self._cache:
            sums = np.zeros((self.num_clips, self.patches.shape[1]), dtype=np.float64)
            np.add.at(sums, self.owner, self.unit_patches())
            self._cache["means"] = (sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
        return self._cache["means"]


def clip_patches(clips: ClipSet, rows, patch: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(row, mono patch [patch]) for every patch of every clip in ``rows``; a clip shorter
    than a patch is zero-padded into one."""
    for row in rows:
        wave = clips.wave(row)
        if len(wave) < patch:
            wave = np.pad(wave, (0, patch - len(wave)))
        for start in patch_starts(len(wave), patch, hop):
            yield int(row), wave[start:start + patch]


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


@torch.no_grad()
def embed_clips(encoder: torch.nn.Module, frontend: FrontendConfig, clips: ClipSet, *,
                patch_seconds: float, hop_seconds: float, batch_size: int,
                device: torch.device, rows=None) -> ClipEmbeddings:
    """Embed every patch (``patch_seconds`` long, every ``hop_seconds``) of every clip (of
    the clips ``rows`` when given, in their order)."""
    encoder = encoder.to(device).eval()
    logmel = LogMel(frontend).to(device)
    patch = int(patch_seconds * clips.sample_rate)
    hop = max(1, int(hop_seconds * clips.sample_rate))
    dtype = next(encoder.parameters()).dtype  # bf16 weights (DeepSpeed's bf16) take bf16 log-mels
    out, owner = [], []
    for rows, waves in patch_batches(clips, range(len(clips)) if rows is None else rows, patch, hop, batch_size):
        out.append(encoder(logmel(torch.from_numpy(waves).to(device)).to(dtype)).float().cpu().numpy())
        owner.append(rows)
    if not out:  # no rows: an empty share
        return ClipEmbeddings(np.zeros((0, encoder.embedding_dim), np.float32), np.zeros(0, np.int64))
    return ClipEmbeddings(np.concatenate(out), np.concatenate(owner))
