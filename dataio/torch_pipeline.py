"""The webdataset back end: shards -> decoded clips -> view batches.

An explicit pipeline of small stages, each a generator:
shard order for the epoch -> this rank's shards -> this worker's shards (or samples)
-> raw samples, cycled so a worker never runs dry -> seeded shuffle buffer
-> decode + crop views -> wave batches -> the augmentation stage (waveform ops, log-mel,
log-mel ops): in the loader workers on a CPU training device, on the device otherwise.

Determinism is what makes mid-epoch resume exact: the shard order depends on
(seed, epoch), the shuffle on (seed, epoch, rank, worker), the crops on
(seed, epoch, clip index, pass), the augmentations on keys of their own (see
:mod:`dataio.augment.keyed`), so batch ``s`` of an epoch is the same whether the
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

from dataio.augment import Augmenter, BatchIds
from dataio.batch import Batch, DataConfig, Placement
from dataio.manifest import Manifest, split_for_worker, split_shards
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
    """Batches ``start_step .. steps-1`` of one epoch for one rank.

    Step ``s`` belongs to logical worker ``s % W`` (W = loader workers). DataLoader polls
    its workers round-robin from worker 0, so worker ``w`` plays logical worker
    ``(w + start_step) % W``: batches arrive in step order whatever the start step.
    With ``in_workers`` the workers run the augmentation stage and yield log-mel
    ``views``; otherwise they yield ``waves`` [B, V, augmenter.input_samples].
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, place: Placement, *,
                 epoch: int, start_step: int, in_workers: bool):
        self.cfg, self.manifest, self.augmenter, self.place = cfg, manifest, augmenter, place
        self.epoch, self.start_step, self.in_workers = epoch, start_step, in_workers
        self.view_len = int(round(cfg.view_seconds * manifest.sample_rate))
        self.read_len = augmenter.input_samples
        self.gap = int(round(cfg.view_gap * manifest.sample_rate))

    def rank_shards(self) -> list[int]:
        order = np.random.default_rng((self.place.seed, self.epoch)).permutation(len(self.manifest.shards))
        return [int(order[i]) for i in split_shards(len(order), self.place.rank, self.place.world_size)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.start_step) % workers
        split = split_for_worker(self.rank_shards(), logical, workers)
        steps = self.place.steps
        my_steps = range(logical, steps, workers)  # lazily: an epoch may be very long
        errors: list = []
        seed, rank = self.place.seed, self.place.rank
        rank_seed = (seed, self.epoch, rank, logical if split.sample_stride == 1 else 0)
        rng = np.random.default_rng((seed, self.epoch, rank, logical, 7))
        samples = _shuffled(_worker_stream(self.manifest, split, rank_seed, errors),
                            self.cfg.shuffle_buffer, rng)
        clips = self.cfg.batch_size // self.cfg.pairs_per_clip  # clips decoded per batch
        done = len(range(logical, min(self.start_step, steps), workers))
        for _ in itertools.islice(samples, clips * done):
            pass
        for step in my_steps[done:]:
            yield self._batch(samples, errors, step)

    def _batch(self, samples: Iterator[tuple], errors: list, step: int) -> dict:
        waves, labels, indices, draws, keys = [], [], [], [], []
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
            draws.extend(pass_no * k + i for i in range(k))
            keys.extend([sample["__key__"]] * k)
        out = {"waves": torch.from_numpy(np.stack(waves)), "labels": torch.from_numpy(np.asarray(labels)),
               "indices": torch.tensor(indices), "draws": torch.tensor(draws), "keys": keys,
               "epoch": self.epoch, "step": step, "skipped": len(errors) - skipped_before, "short": short}
        if self.in_workers:
            out["views"] = self.augmenter.from_waves(out.pop("waves"), batch_ids(out, self.place.rank))
        return out

    def _decode(self, sample: dict, pass_no: int, errors: list):
        """(views [K*V, S], label id, index, length in samples) of one raw sample, or None
        if it is broken."""
        try:
            meta = json.loads(sample["json"])
            index = int(meta["index"])
            rng = np.random.default_rng((self.place.seed, self.epoch, index, pass_no))
            with sf.SoundFile(io.BytesIO(sample["flac"])) as source:
                if source.samplerate != self.manifest.sample_rate or source.frames == 0:
                    raise ValueError(f"rate {source.samplerate} Hz, {source.frames} samples")
                views = read_views(source, self.cfg.num_views * self.cfg.pairs_per_clip, self.read_len, rng,
                                   gap=self.gap, group=self.cfg.num_views)
                length = source.frames
            if not np.isfinite(views).all():
                raise ValueError("non-finite samples")
        except Exception as err:  # a broken member must not stop training
            errors.append(f"{sample.get('__key__')}: {err!r}")
            log.warning("skipping clip %s: %r", sample.get("__key__"), err)
            return None
        return views, self.manifest.label_target(meta.get("labels") or []), index, length


def batch_ids(wave_batch: dict, rank: int) -> BatchIds:
    return BatchIds(indices=wave_batch["indices"], draws=wave_batch["draws"], epoch=wave_batch["epoch"],
                    step=wave_batch["step"], rank=rank)


def keep_freed_memory() -> bool:
    """Ask glibc to serve tensors up to 32 MiB from its heap and to keep freed memory,
    instead of mapping fresh pages for every large tensor and unmapping them when it is
    freed: the augmentation stage allocates a dozen batch-sized temporaries per batch, and
    first-touching new pages (page faults) cost more than the arithmetic on them (about
    2.5x on the stage, measured on this project's CPU machines). No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 512 << 20))
    except (OSError, AttributeError):
        return False


def _worker_init(_: int) -> None:
    keep_freed_memory()
    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    # a scheduler's SIGTERM goes to the whole process group: the trainer handles it (saves
    # a checkpoint, then exits); its loader workers must live until then
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def wave_loader(cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, place: Placement, *,
                epoch: int, start_step: int, in_workers: bool) -> DataLoader:
    """A DataLoader over :class:`WaveBatches` (batching happens inside the workers)."""
    dataset = WaveBatches(cfg, manifest, augmenter, place, epoch=epoch, start_step=start_step,
                          in_workers=in_workers)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      prefetch_factor=2 if cfg.num_workers else None,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init)


class DeviceFeeder:
    """Moves loader batches to the device as :class:`Batch` es, running the augmentation
    stage there unless the loader workers already did."""

    def __init__(self, augmenter: Augmenter, place: Placement):
        self.augmenter, self.place = augmenter, place
        self.augmenter.logmel.to(place.device)

    def __call__(self, wave_batch: dict) -> Batch:
        device = self.place.device
        if "views" in wave_batch:
            views = wave_batch["views"].to(device, non_blocking=True)
        else:
            waves = wave_batch["waves"].to(device, non_blocking=True)
            views = self.augmenter.from_waves(waves, batch_ids(wave_batch, self.place.rank))
        return Batch(views=views, labels=wave_batch["labels"].to(device, non_blocking=True),
                     indices=wave_batch["indices"].to(device, non_blocking=True),
                     keys=list(wave_batch["keys"]), skipped=int(wave_batch["skipped"]),
                     short=int(wave_batch["short"]))


class TorchSource:
    """The webdataset back end: a fresh loader per epoch, positioned from the step alone.
    On a CPU training device the loader workers run the augmentation stage, in parallel
    with the training step, instead of the (busy) main process."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, place: Placement):
        self.cfg, self.manifest, self.augmenter, self.place = cfg, manifest, augmenter, place
        self.in_workers = place.device.type == "cpu" and cfg.num_workers > 0
        self.feed = DeviceFeeder(augmenter, place)

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        loader = wave_loader(self.cfg, self.manifest, self.augmenter, self.place, epoch=epoch,
                             start_step=start_step, in_workers=self.in_workers)
        for wave_batch in loader:
            yield self.feed(wave_batch)

    def state(self) -> None:
        return None
