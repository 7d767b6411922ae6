"""Frozen-encoder embeddings of labelled shards: every clip cut into patches."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from dataio.frontend import FrontendConfig, LogMel
from dataio.manifest import Manifest
from dataio.views import patch_starts

log = logging.getLogger(__name__)


@dataclass
class ClipEmbeddings:
    """patches: [P_total, D] float32 patch embeddings; owner: [P_total] clip row of each
    patch; labels: [N] label ids (-1 = none); folds: [N] (0 = none); splits: N strings."""

    patches: np.ndarray
    owner: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    splits: list[str]
    keys: list[str]

    def clip_means(self) -> np.ndarray:
        """[N, D]: the mean of each clip's L2-normalised patch embeddings, renormalised."""
        unit = self.patches / (np.linalg.norm(self.patches, axis=1, keepdims=True) + 1e-12)
        sums = np.zeros((len(self.labels), unit.shape[1]), dtype=np.float64)
        np.add.at(sums, self.owner, unit)
        return (sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def _clips(manifest: Manifest):
    """(key, mono wave, meta) of every readable clip, shard by shard in manifest order."""
    skipped = 0
    for path in manifest.shard_paths():
        for sample in wds.tarfile_samples([{"url": str(path)}], handler=wds.warn_and_continue):
            try:
                wave, _ = sf.read(io.BytesIO(sample["flac"]), dtype="float32", always_2d=True)
                yield sample["__key__"], wave.mean(axis=1), json.loads(sample["json"])
            except Exception as err:  # one broken clip must not end an evaluation
                skipped += 1
                log.warning("skipping %s: %r", sample.get("__key__"), err)
    if skipped:
        log.warning("%d clip(s) could not be decoded and were left out", skipped)


@torch.no_grad()
def embed_shards(encoder: torch.nn.Module, frontend: FrontendConfig, manifest: Manifest, *,
                 patch_seconds: float, hop_seconds: float, batch_size: int,
                 device: torch.device) -> ClipEmbeddings:
    """Embed every patch (``patch_seconds`` long, every ``hop_seconds``) of every clip."""
    encoder = encoder.to(device).eval()
    logmel = LogMel(frontend).to(device)
    patch, hop = int(patch_seconds * manifest.sample_rate), max(1, int(hop_seconds * manifest.sample_rate))
    pending, owners, out_patches, out_owner = [], [], [], []
    labels, folds, splits, keys = [], [], [], []

    def flush() -> None:
        feats = logmel(torch.from_numpy(np.stack(pending)).to(device))
        out_patches.append(encoder(feats).float().cpu().numpy())
        out_owner.extend(owners)
        pending.clear()
        owners.clear()

    for key, wave, meta in _clips(manifest):
        row = len(labels)
        names = meta.get("labels") or []
        labels.append(manifest.label_id(names[0]) if names else -1)
        folds.append(int(meta.get("fold") or 0))
        splits.append(str(meta.get("split") or ""))
        keys.append(key)
        if len(wave) < patch:
            wave = np.pad(wave, (0, patch - len(wave)))
        for start in patch_starts(len(wave), patch, hop):
            pending.append(wave[start:start + patch])
            owners.append(row)
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    if not labels:
        raise ValueError(f"no readable clip in {manifest.root}")
    return ClipEmbeddings(np.concatenate(out_patches), np.asarray(out_owner), np.asarray(labels),
                          np.asarray(folds), splits, keys)
