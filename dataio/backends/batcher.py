"""One training batch from a stream of raw samples: the clips opened in their clip
format, their crops drawn at once from keyed hashes, the views cut straight into the
batch, broken clips named, skipped and counted.

What a loader worker of the torch back end does for each batch (:mod:`dataio.backends.torch_pipeline`
decides which samples, in which order): the payload of the clip format (int16 samples of
flac and pcm16, float16 dB frames of logmel: :mod:`dataio.formats`) comes out, only the
views' samples or frames; :func:`stage` runs the augmentation chain on it, wherever the
batch is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator

import numpy as np
import torch

from dataio.augment import Augmenter, BatchIds
from dataio.backends.batch import DataConfig, LoaderBatch
from dataio.backends.views import crop_keys, keyed_crop_starts
from dataio.errors import NoReadableClips, ShardMismatch
from dataio.formats.codec import ClipCodec, non_finite_rows
from dataio.reading.manifest import Manifest
from dataio.stop_signal import raise_if_stopping

log = logging.getLogger(__name__)


class BatchMaker:
    """Batches of ``cfg.batch_size`` view sets of one reader's samples. ``epoch`` keys the
    crops; ``bad_since`` tracks a run of unusable clips (reset each epoch), so a reader
    whose whole pass (``by_shard``: every shard) is unusable stops with a named error."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, seed: int, by_shard: bool):
        self.cfg, self.manifest, self.seed, self.by_shard = cfg, manifest, seed, by_shard
        self.epoch, self.bad_since = 0, None
        self.codec = ClipCodec.of(manifest)
        rate = manifest.sample_rate
        if self.codec.is_wave:  # crops in samples
            self.units, self.view_len, self.read_len = "samples", int(round(cfg.view_seconds * rate)), \
                augmenter.input_samples
            self.gap = int(round(cfg.view_gap * rate))
        else:  # crops in frames of the stored log-mel
            self.units, self.view_len, self.read_len = "frames", augmenter.frames, augmenter.mel_frames_in
            self.gap = int(round(cfg.view_gap * rate / augmenter.frontend.hop_length))

    def batch(self, samples: Iterator[tuple], errors: list, step: int) -> LoaderBatch:
        """The next batch: ``batch_size // pairs_per_clip`` usable clips from ``samples``,
        their crops drawn at once and cut straight into the batch, K view sets each."""
        k, v = self.cfg.pairs_per_clip, self.cfg.num_views
        skipped_before, clips = len(errors), []
        payload = self.codec.payload(self.cfg.batch_size // k, k * v, self.read_len)
        while len(clips) < len(payload):
            opened = [c for c in (self._open(*next(samples), errors)
                                  for _ in range(len(payload) - len(clips))) if c is not None]
            if not opened:
                continue
            keys = crop_keys(self.seed, self.epoch, np.array([c.index for c in opened]),
                             np.array([c.pass_no for c in opened]))
            starts = keyed_crop_starts(np.array([c.clip.length for c in opened]), self.read_len, k * v, keys,
                                       gap=self.gap, group=v)
            first = len(clips)
            for clip, where in zip(opened, starts):
                if self._cut(clip, where, payload[len(clips)], errors):
                    clips.append(clip)
            if payload.dtype == np.float16:  # float16 members (log-mels) may hold a NaN or an infinity
                clips = self._finite(payload, clips, first, errors)
        payload = payload.reshape(len(clips) * k, v, *payload.shape[2:])
        return LoaderBatch(payload=torch.from_numpy(payload),
                           labels=torch.from_numpy(np.repeat(np.asarray([c.label for c in clips]), k, axis=0)),
                           indices=torch.tensor([c.index for c in clips]).repeat_interleave(k),
                           draws=torch.tensor([c.pass_no * k + i for c in clips for i in range(k)]),
                           keys=[c.key for c in clips for _ in range(k)], epoch=self.epoch, step=step,
                           skipped=len(errors) - skipped_before,
                           short=k * sum(c.clip.length < self.view_len for c in clips),
                           sources=torch.tensor(self._per_source(clips), dtype=torch.int64))

    def _finite(self, payload: np.ndarray, clips: list[_Opened], first: int, errors: list) -> list[_Opened]:
        """``clips`` without those from ``first`` on whose frames are not finite (counted);
        the rows of the others moved up to stay in order."""
        bad = non_finite_rows(payload[first:len(clips)])
        if not bad.any():
            return clips
        kept = clips[:first]
        for row, clip in enumerate(clips[first:], start=first):
            if bad[row - first]:
                what = "samples" if self.codec.is_wave else "log-mel values"
                self._broken(clip.sample, ValueError(f"non-finite {what}"), errors, clip.pass_no)
                continue
            payload[len(kept)] = payload[row]
            kept.append(clip)
        return kept

    def _per_source(self, clips: list[_Opened]) -> list[int]:
        """With several corpora: how many view sets of the batch each gave."""
        counts = [0] * len(self.manifest.sources)
        for c in clips if counts else ():
            counts[self.manifest.shards[c.shard].source] += self.cfg.pairs_per_clip
        return counts

    def _open(self, pass_no: int, sample: dict, errors: list) -> _Opened | None:
        """A sample's JSON read and its member opened, or None (a broken or, with
        ``short_clips=skip``, a short clip: counted in ``errors``)."""
        try:
            meta = json.loads(sample["json"])
            index = int(meta["index"]) + self.manifest.index_offset(sample["__shard__"])
            clip = self.codec.open(sample[self.codec.ext])
            if clip.length < self.view_len and self.cfg.short_clips == "skip":
                errors.append(f"{sample['__key__']}: {clip.length} {self.units}, shorter than a view")
                self._no_clip(pass_no, sample, errors)
                return None
        except Exception as err:  # a broken member must not stop training
            self._broken(sample, err, errors, pass_no)
            return None
        self._check_index(int(meta["index"]), sample)
        return _Opened(clip, self.manifest.label_target(meta.get("labels") or []), index, pass_no,
                       sample["__key__"], sample["__shard__"], sample)

    def _check_index(self, index: int, sample: dict) -> None:
        """ShardMismatch unless the clip JSON's ``index`` lies inside its corpus (a memory
        bank and the augmentation keys are indexed by it)."""
        limit = self.manifest.clips_of(sample["__shard__"])
        if not 0 <= index < limit:
            where = self.manifest.shards[sample["__shard__"]].url
            raise ShardMismatch(f"clip {sample['__key__']} of shard {where} has index {index}, outside the "
                                f"0..{limit - 1} of the num_clips={limit} its manifest lists: the manifest of "
                                f"{self.manifest.where} does not describe its shards; run `audioclr check-shards` "
                                f"on it, or shard the audio again")

    def _cut(self, opened: _Opened, starts: np.ndarray, out: np.ndarray, errors: list) -> bool:
        """Cut ``opened``'s views at ``starts`` into ``out`` (False: it failed, and is counted)."""
        try:
            opened.clip.cut(starts, self.read_len, out)
        except Exception as err:  # a FLAC member can fail past its header
            self._broken(opened.sample, err, errors, opened.pass_no)
            return False
        self.bad_since = None
        return True

    def _broken(self, sample: dict, err: Exception, errors: list, pass_no: int) -> None:
        raise_if_stopping()  # the read failed because a stop arrived inside the decoder
        errors.append(f"{sample.get('__key__')}: {err!r}")
        log.warning("skipping clip %s: %r", sample.get("__key__"), err)
        self._no_clip(pass_no, sample, errors)

    def _no_clip(self, pass_no: int, sample: dict, errors: list) -> None:
        """Raise once a whole pass over this worker's samples gave no usable clip (resampled:
        once every shard has been drawn since the last usable clip)."""
        if self.by_shard:
            self.bad_since = (self.bad_since or set()) | {sample["__shard__"]}
            whole = len(self.bad_since) == len(self.manifest.shards)
        elif self.bad_since is None:
            self.bad_since, whole = pass_no, False
        else:
            whole = pass_no >= self.bad_since + 2  # pass _bad_since + 1 was all failures
        if whole:
            raise NoReadableClips(f"no usable clip in a whole pass over this worker's shards of "
                                  f"{self.manifest.where} ({len(errors)} failures; last: {errors[-1]}); "
                                  f"list the broken members with `audioclr check-shards`")


@dataclasses.dataclass
class _Opened:
    """A clip of the batch being assembled: its opened member, label, dataset index, pass,
    key, shard and raw sample."""

    clip: object
    label: object
    index: int
    pass_no: int
    key: str
    shard: int
    sample: dict


def stage(augmenter: Augmenter, codec: ClipCodec, payload: torch.Tensor, ids: BatchIds) -> torch.Tensor:
    """The augmentation stage on a batch's payload as ``codec``'s format stores it
    (samples [B, V, S], or dB frames [B, V, T, F]) -> views [B, V, C, F, T]."""
    fmt = codec.format
    return augmenter.augment(fmt.to_stage(payload), ids, fmt.arrives_as)
