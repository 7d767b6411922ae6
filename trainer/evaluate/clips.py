"""The labelled clips of a shard folder, held in memory for the evaluation protocols.

Clips stay FLAC-compressed in memory (about half of 16-bit PCM, a quarter of float32):
ESC-50, US8K or GTZAN fit many times over, and a fine-tuning epoch decodes only the
crop it trains on.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from dataio.manifest import Manifest
from dataio.torch_pipeline import raw_samples

log = logging.getLogger(__name__)


@dataclass
class ClipSet:
    """N clips: ``audio`` the encoded bytes; ``labels`` [N] id of the first label (-1 =
    none); ``targets`` [N, C] multi-hot over the vocabulary; ``folds`` [N] (0 = none);
    ``splits`` N strings ("train", "val", "test" or "")."""

    keys: list[str]
    audio: list[bytes]
    labels: np.ndarray
    targets: np.ndarray
    folds: np.ndarray
    splits: np.ndarray
    class_names: list[str]
    multilabel: bool
    sample_rate: int

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def wave(self, row: int) -> np.ndarray:
        """The whole clip, mono float32 [S]."""
        wave, _ = sf.read(io.BytesIO(self.audio[row]), dtype="float32", always_2d=True)
        return wave.mean(axis=1)

    def open(self, row: int) -> sf.SoundFile:
        """The clip as an open file (for reading crops without decoding the rest)."""
        return sf.SoundFile(io.BytesIO(self.audio[row]))


def load_clipset(manifest: Manifest) -> ClipSet:
    """Every clip of ``manifest`` whose audio decodes; a broken clip is logged and left out
    (one bad file must not end an evaluation). Labels outside the vocabulary are ignored."""
    keys, audio, labels, targets, folds, splits = [], [], [], [], [], []
    vocab, skipped = list(manifest.vocabulary), 0
    for sid in range(len(manifest.shards)):  # a local folder or a URL, streamed (dataio.remote)
        for sample in raw_samples(manifest, [sid], []):
            try:
                data, meta = sample["flac"], json.loads(sample["json"])  # the shards' KEY.flac + KEY.json
                sf.info(io.BytesIO(data))  # reads the header: catches truncated and foreign files
            except Exception as err:
                skipped += 1
                log.warning("leaving out %s: %r", sample.get("__key__"), err)
                continue
            ids = [i for i in (manifest.label_id(n) for n in meta.get("labels") or []) if i >= 0]
            target = np.zeros(len(vocab), dtype=np.float32)
            target[ids] = 1.0
            keys.append(sample["__key__"])
            audio.append(data)
            labels.append(ids[0] if ids else -1)
            targets.append(target)
            folds.append(int(meta.get("fold") or 0))
            splits.append(str(meta.get("split") or ""))
    if skipped:
        log.warning("%d clip(s) could not be read and were left out", skipped)
    if not keys:
        raise ValueError(f"no readable clip in {manifest.where}")
    if not vocab:
        raise ValueError(f"the shards in {manifest.where} carry no label vocabulary: evaluation needs labels")
    return ClipSet(keys, audio, np.asarray(labels), np.stack(targets), np.asarray(folds),
                   np.asarray(splits), vocab, manifest.multi_label, manifest.sample_rate)
