"""The labelled clips of a shard folder for the evaluation protocols.

A :class:`ClipSet` keeps what the protocols need of every clip (key, labels, fold, split,
the shard it is in) and, by default, not its audio: every protocol reads the shards again
as it needs the clips, so memory grows with the embeddings, not with the corpus (the audio
of 100k 1-s FLAC clips is about 2 GB). The frozen protocols and the scoring of a
fine-tuned encoder decode each clip as it is embedded (:meth:`ClipSet.waves`); fine-tuning
reads its training clips shard by shard, in a seeded order, each epoch
(:meth:`ClipSet.encoded`). Only the online probe, which must outlive its folder, loads
with ``keep_audio=True``: the clips stay encoded as the shards hold them (FLAC: about half
of 16-bit PCM; pcm16: the 16-bit samples).

Evaluation computes the encoder's own log-mels, so it needs audio: a logmel corpus is
refused, naming the way on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dataio.backends.views import crop_starts
from dataio.formats.codec import ClipCodec
from dataio.reading.manifest import Manifest
from dataio.reading.streams import raw_samples
from dataio.stop_signal import raise_if_stopping

log = logging.getLogger(__name__)


@dataclass
class ClipSet:
    """N clips: ``labels`` [N] id of the first label (-1 = none); ``targets`` [N, C]
    multi-hot over the vocabulary; ``folds`` [N] (0 = none); ``splits`` N strings
    ("train", "val", "test" or ""). Their audio is ``audio`` (N encoded clips) when held,
    else read from the shards of ``manifest``, row i being in shard ``shard_of[i]``."""

    keys: list[str]
    labels: np.ndarray
    targets: np.ndarray
    folds: np.ndarray
    splits: np.ndarray
    class_names: list[str]
    multilabel: bool
    sample_rate: int
    clip_format: str = "flac"
    audio: list[bytes] | None = None
    manifest: Manifest | None = None
    shard_of: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def codec(self) -> ClipCodec:
        return ClipCodec(self.clip_format, self.sample_rate)

    @property
    def held(self) -> bool:
        return self.audio is not None

    def _decode(self, data: bytes) -> np.ndarray:
        return self.codec.format.floats(self.codec.open(data).whole())

    def wave(self, row: int) -> np.ndarray:
        """The whole held clip, mono float32 [S]."""
        return self._decode(self._held()[row])

    def crop(self, data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
        """A random ``size``-sample crop of the encoded clip ``data`` (zero-padded when it is
        shorter), as the format stores samples (times ``codec.format.scale``: the wave); only
        the crop is decoded."""
        clip = self.codec.open(data)
        return clip.cut(crop_starts(clip.length, size, 1, rng), size)[0]

    def _held(self) -> list[bytes]:
        if self.audio is None:
            raise RuntimeError("this clip set holds no audio: load it with keep_audio=True")
        return self.audio

    def waves(self, rows) -> Iterator[tuple[int, np.ndarray]]:
        """(row, mono float32 wave [S]) of each of ``rows``, in increasing row order, each
        clip decoded when it is reached: only the shards holding ``rows`` are read."""
        for row, data in self.encoded(rows):
            yield row, self._decode(data)

    def encoded(self, rows, shards=None) -> Iterator[tuple[int, bytes]]:
        """(row, encoded clip) of each of ``rows``, shard by shard: the shards holding them
        in increasing order (rows in increasing order), or in the order ``shards`` lists
        them; a shard's clips in the order it holds them. Read from the shards unless the
        audio is held, reading only the shards named."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        found = 0
        for sid in np.unique(self.shard_of[rows]) if shards is None else shards:
            for row, data in self._shard_members(int(sid), rows):
                found += 1
                yield row, data
        if found < len(rows):
            raise ValueError(f"the shards in {self.manifest.where} changed since they were read: "
                             f"{len(rows) - found} clip(s) are no longer there")

    def _shard_members(self, sid: int, rows: np.ndarray) -> Iterator[tuple[int, bytes]]:
        """(row, encoded clip) of the wanted ``rows`` in shard ``sid``, found by key (a
        member left out at load, or not wanted, is passed over)."""
        wanted = rows[self.shard_of[rows] == sid]
        if self.audio is not None:
            for row in wanted:
                yield int(row), self.audio[row]
            return
        row_of = {self.keys[r]: int(r) for r in wanted}
        for sample in raw_samples(self.manifest, [sid], []):
            row = row_of.pop(sample.get("__key__"), None)
            if row is not None:
                yield row, bytes(sample[self.codec.ext])


def _read_member(sample: dict, codec: ClipCodec) -> tuple[bytes, dict]:
    data, meta = bytes(sample[codec.ext]), json.loads(sample["json"])  # KEY.flac|pcm + KEY.json
    codec.open(data)  # reads the header: catches truncated, odd-sized and foreign members
    return data, meta


def load_clipset(manifest: Manifest, keep_audio: bool = False) -> ClipSet:
    """Every clip of ``manifest`` whose audio decodes, its audio held only with
    ``keep_audio``; a broken clip is logged and left out (one bad file must not end an
    evaluation). Labels outside the vocabulary are ignored."""
    if not manifest.format.is_wave:
        raise ValueError(f"{manifest.where} is a {manifest.clip_format} corpus: evaluation computes the encoder's "
                         f"log-mels from audio, so evaluate on the flac or pcm16 corpus of the same clips")
    keys, audio, labels, folds, splits, shard_of, ids_of = [], [], [], [], [], [], []
    vocab, skipped = list(manifest.vocabulary), 0
    codec = ClipCodec.of(manifest)
    for sid in range(len(manifest.shards)):  # a local folder or a URL, streamed (dataio.reading.remote)
        for sample in raw_samples(manifest, [sid], []):
            try:
                data, meta = _read_member(sample, codec)
            except Exception as err:
                raise_if_stopping()  # a stop inside the decoder is not a broken clip
                skipped += 1
                log.warning("leaving out %s: %r", sample.get("__key__"), err)
                continue
            ids = [i for i in (manifest.label_id(n) for n in meta.get("labels") or []) if i >= 0]
            keys.append(sample["__key__"])
            if keep_audio:
                audio.append(data)
            ids_of.append(ids)
            labels.append(ids[0] if ids else -1)
            folds.append(int(meta.get("fold") or 0))
            splits.append(str(meta.get("split") or ""))
            shard_of.append(sid)
    if skipped:
        log.warning("%d clip(s) could not be read and were left out", skipped)
    if not keys:
        raise ValueError(f"no readable clip in {manifest.where}")
    if not vocab:
        raise ValueError(f"the shards in {manifest.where} carry no label vocabulary: evaluation needs labels")
    targets = np.zeros((len(keys), len(vocab)), dtype=np.float32)
    for row, ids in enumerate(ids_of):
        targets[row, ids] = 1.0
    return ClipSet(keys, np.asarray(labels), targets, np.asarray(folds), np.asarray(splits), vocab,
                   manifest.multi_label, manifest.sample_rate, manifest.clip_format,
                   audio if keep_audio else None, manifest, np.asarray(shard_of, dtype=np.int32))
