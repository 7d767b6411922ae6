"""The labelled clips of a shard folder, held in memory for the evaluation protocols.

Clips stay encoded in memory as the shards hold them (FLAC: about half of 16-bit PCM, a
quarter of float32; pcm16: the 16-bit samples): ESC-50, US8K or GTZAN fit many times
over, and a fine-tuning epoch reads only the crop it trains on. Evaluation computes the
encoder's own log-mels, so it needs audio: a logmel corpus is refused, naming the way on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from dataio.formats import PCM_SCALE, ClipCodec
from dataio.manifest import Manifest
from dataio.streams import raw_samples
from dataio.views import crop_starts

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
    clip_format: str = "flac"

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def codec(self) -> ClipCodec:
        return ClipCodec(self.clip_format, self.sample_rate)

    def wave(self, row: int) -> np.ndarray:
        """The whole clip, mono float32 [S]."""
        return self.codec.open(self.audio[row]).whole() * np.float32(PCM_SCALE)

    def crop(self, row: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """A random ``size``-sample crop of the clip (zero-padded when it is shorter), float32
        [size]; only the crop is decoded."""
        clip = self.codec.open(self.audio[row])
        return clip.cut(crop_starts(clip.length, size, 1, rng), size)[0] * np.float32(PCM_SCALE)


def load_clipset(manifest: Manifest) -> ClipSet:
    """Every clip of ``manifest`` whose audio decodes; a broken clip is logged and left out
    (one bad file must not end an evaluation). Labels outside the vocabulary are ignored."""
    if manifest.clip_format == "logmel":
        raise ValueError(f"{manifest.where} is a logmel corpus: evaluation computes the encoder's log-mels from "
                         f"audio, so evaluate on the flac or pcm16 corpus of the same clips")
    keys, audio, labels, targets, folds, splits = [], [], [], [], [], []
    vocab, skipped = list(manifest.vocabulary), 0
    codec = ClipCodec.of(manifest)
    for sid in range(len(manifest.shards)):  # a local folder or a URL, streamed (dataio.remote)
        for sample in raw_samples(manifest, [sid], []):
            try:
                data, meta = bytes(sample[codec.ext]), json.loads(sample["json"])  # KEY.flac|pcm + KEY.json
                codec.open(data)  # reads the header: catches truncated, odd-sized and foreign members
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
                   np.asarray(splits), vocab, manifest.multi_label, manifest.sample_rate, manifest.clip_format)
