"""The webdataset back end: shards -> decoded clips -> two-view wave batches.

An explicit pipeline of small stages, each a generator:
shard order for the epoch -> this rank's shards -> this worker's shards (or samples)
-> raw samples, cycled so a worker never runs dry -> seeded shuffle buffer
-> decode + crop views -> batches.

Determinism is what makes mid-epoch resume exact: the shard order depends on
(seed, epoch), the shuffle on (seed, epoch, rank, worker), the crops on
(seed, epoch, clip index, pass), so batch ``s`` of an epoch is the same whether the
loader started at step 0 or at step ``s``. Skipping to ``start_step`` reads the
skipped samples' bytes but decodes nothing.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import signal
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataio.frontend import FrontendConfig, LogMel
from dataio.manifest import Manifest, split_for_worker, split_shards
from dataio.pipeline import DataConfig
from dataio.views import read_views

log = logging.getLogger(__name__)


class NoReadableClips(RuntimeError):
    """A worker's shards yielded no sample at all."""


def _raw_samples(manifest: Manifest, shard_ids: list[int], errors: list) -> Iterator[dict]:
    """Samples ({'__key__', 'flac', 'json'}) of the given shards, in order; a corrupt or
    truncated tar is logged, counted in ``errors`` and left behind."""
    def on_error(exc: Exception) -> bool:
        errors.append(repr(exc))
        log.warning("skipping unreadable shard data: %r", exc)
        return True

    paths = manifest.shard_paths()
    for sid in shard_ids:
        src = [{"url": str(paths[sid])}]
        yield from wds.tarfile_samples(src, handler=on_error)


def _worker_stream(manifest: Manifest, split, rank_seed: tuple, errors: list) -> Iterator[tuple]:
    """Endless (pass number, raw sample) pairs of one worker: its shards in a fresh order
    each pass, keeping every ``stride``-th sample; raises if a whole pass is empty."""
    for pass_no in itertools.count():
        order = np.random.default_rng((*rank_seed, pass_no)).permutation(len(split.shards))
        shard_ids = [split.shards[i] for i in order]
        found = False
        for k, sample in enumerate(_raw_samples(manifest, shard_ids, errors)):
            if k % split.sample_stride == split.sample_offset and "flac" in sample:
                found = True
                yield pass_no, sample
        if not found:
            raise NoReadableClips(f"no readable clip in shards {[manifest.shards[i].url for i in split.shards]}")


def _shuffled(stream: Iterator[tuple], size: int, rng: np.random.Generator) -> Iterator[tuple]:
    """A seeded shuffle buffer that never mixes two passes (so one pass over a worker's
    clips is yielded completely before the next begins)."""
    buffer: list = []
    current = None
    for item in stream:
        if current is not None and item[0] != current:
            while buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        current = item[0]
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class WaveBatches(IterableDataset):
    """Wave batches ``start_step .. steps-1`` of one epoch for one rank.

    Step ``s`` belongs to logical worker ``s % W`` (W = loader workers). DataLoader polls
    its workers round-robin from worker 0, so worker ``w`` plays logical worker
    ``(w + start_step) % W``: batches arrive in step order whatever the start step.
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, *, epoch: int, start_step: int,
                 steps: int, rank: int, world_size: int, seed: int, frontend: FrontendConfig | None = None):
        self.cfg, self.manifest = cfg, manifest
        # on a CPU training device the workers compute the log-mel themselves, in parallel
        # with the training step, instead of handing waves to the (busy) main process
        self.logmel = LogMel(frontend) if frontend is not None else None
        self.epoch, self.start_step, self.steps = epoch, start_step, steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.view_len = int(round(cfg.view_seconds * manifest.sample_rate))

    def rank_shards(self) -> list[int]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.manifest.shards))
        return [int(order[i]) for i in split_shards(len(order), self.rank, self.world_size)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.start_step) % workers
        split = split_for_worker(self.rank_shards(), logical, workers)
        my_steps = range(logical, self.steps, workers)  # lazily: an epoch may be very long
        errors: list = []
        rank_seed = (self.seed, self.epoch, self.rank, logical if split.sample_stride == 1 else 0)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, logical, 7))
        samples = _shuffled(_worker_stream(self.manifest, split, rank_seed, errors),
                            self.cfg.shuffle_buffer, rng)
        clips = self.cfg.batch_size // self.cfg.pairs_per_clip  # clips decoded per batch
        done = len(range(logical, min(self.start_step, self.steps), workers))
        for _ in itertools.islice(samples, clips * done):
            pass
        for _ in my_steps[done:]:
            yield self._batch(samples, errors)

    def _batch(self, samples: Iterator[tuple], errors: list) -> dict:
        waves, labels, indices, keys = [], [], [], []
        skipped_before, short = len(errors), 0
        k = self.cfg.pairs_per_clip
        while len(waves) < self.cfg.batch_size:
            pass_no, sample = next(samples)
            clip = self._decode(sample, pass_no, errors)
            if clip is None:
                continue
            if clip[3] < self.view_len:
                if self.cfg.short_clips == "skip":
                    errors.append(f"{sample['__key__']}: {clip[3]} samples, shorter than a view")
                    continue
                short += k
            waves.extend(clip[0].reshape(k, self.cfg.num_views, -1))
            labels.extend([clip[1]] * k)
            indices.extend([clip[2]] * k)
            keys.extend([sample["__key__"]] * k)
        out = torch.from_numpy(np.stack(waves))
        kind = "waves" if self.logmel is None else "views"
        return {kind: out if self.logmel is None else self.logmel(out), "labels": torch.from_numpy(np.asarray(labels)),
                "indices": torch.tensor(indices), "keys": keys,
                "skipped": len(errors) - skipped_before, "short": short}

    def _decode(self, sample: dict, pass_no: int, errors: list):
        """(views [K*V, S], label id, index, length in samples) of one raw sample, or None
        if it is broken."""
        try:
            meta = json.loads(sample["json"])
            index = int(meta["index"])
            rng = np.random.default_rng((self.seed, self.epoch, index, pass_no))
            with sf.SoundFile(io.BytesIO(sample["flac"])) as source:
                if source.samplerate != self.manifest.sample_rate or source.frames == 0:
                    raise ValueError(f"rate {source.samplerate} Hz, {source.frames} samples")
                views = read_views(source, self.cfg.num_views * self.cfg.pairs_per_clip, self.view_len,
                                   self.cfg.gain_db, rng)
                length = source.frames
            if not np.isfinite(views).all():
                raise ValueError("non-finite samples")
        except Exception as err:  # a broken member must not stop training
            errors.append(f"{sample.get('__key__')}: {err!r}")
            log.warning("skipping clip %s: %r", sample.get("__key__"), err)
            return None
        return views, self.manifest.label_target(meta.get("labels") or []), index, length


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    # a scheduler's SIGTERM goes to the whole process group: the trainer handles it (saves
    # a checkpoint, then exits); its loader workers must live until then
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def wave_loader(cfg: DataConfig, manifest: Manifest, *, epoch: int, start_step: int, steps: int,
                rank: int, world_size: int, seed: int, frontend: FrontendConfig | None = None) -> DataLoader:
    """A DataLoader over :class:`WaveBatches` (batching happens inside the workers); with
    ``frontend`` the workers return log-mel ``views`` instead of ``waves``."""
    dataset = WaveBatches(cfg, manifest, epoch=epoch, start_step=start_step, steps=steps,
                          rank=rank, world_size=world_size, seed=seed, frontend=frontend)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      prefetch_factor=2 if cfg.num_workers else None,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init)
