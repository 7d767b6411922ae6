"""The webdataset back end: shards -> clips -> view batches.

An explicit pipeline of small stages, each a generator:
shard order for the epoch -> this rank's shards -> this worker's shards (or samples)
-> raw samples, cycled so a worker never runs dry -> seeded shuffle buffer
-> open the members, draw the batch's crops at once, cut the views -> batches of int16
samples (flac, pcm16) or float16 dB frames (logmel) -> the augmentation stage (waveform
ops, log-mel, log-mel ops): in the loader workers on a CPU training device, on the
device otherwise. A loader worker thus reads, cuts and batches; only the views' samples
or frames leave it, and FLAC is the only format it decodes (:mod:`dataio.formats`).

Determinism is what makes mid-epoch resume exact: the shard order depends on
(seed, epoch), the shuffle on (seed, epoch, rank, worker), the crops on
(seed, epoch, clip index, pass), the augmentations on keys of their own (see
:mod:`dataio.augment.keyed`), so batch ``s`` of an epoch is the same whether the
loader started at step 0 or at step ``s``. A loader started at ``start_step`` counts
its way there and reads only the shard it lands in and what the shuffle buffer held
(:func:`dataio.reading.streams.seek`); with ``data.resampled`` or several corpora it reads the
skipped samples' bytes, decoding nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import logging
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataio.augment import Augmenter, BatchIds
from dataio.augment.keyed import scalar_key
from dataio.backends.batch import Batch, DataConfig, LoaderBatch, LoaderFailure, Placement
from dataio.backends.batcher import BatchMaker, stage
from dataio.backends.source import DataSource
from dataio.errors import DataError
from dataio.formats.codec import ClipCodec
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import Manifest, split_for_reader
from dataio.reading.remote import Retry
from dataio.reading.streams import Shuffled, mixed, resampled_stream, seek, worker_stream
from dataio.workers import check_socket_room

log = logging.getLogger(__name__)


class WaveBatches(IterableDataset):
    """Batches of one rank from ``start_step`` of ``epoch`` on: to the end of that epoch,
    or through every later epoch too (``run_long``, the loader's workers living for the
    whole run).

    Global step ``g`` (epoch * steps + step) belongs to logical worker ``g % W`` (W =
    loader workers). DataLoader polls its workers round-robin from worker 0, so worker
    ``w`` plays logical worker ``(w + first) % W``, ``first`` being the loader's first
    global step: batches arrive in step order wherever the loader starts, and the same
    step gets the same batch from a loader started at any earlier step. With
    ``in_workers`` the workers run the augmentation stage and yield log-mel ``views``;
    otherwise they yield int16 ``waves`` [B, V, augmenter.input_samples] (flac, pcm16) or
    float16 dB ``mels`` [B, V, augmenter.mel_frames_in, F] (logmel).
    """

    def __init__(self, cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, place: Placement, *,
                 epoch: int, start_step: int, in_workers: bool, run_long: bool = False):
        self.cfg, self.manifest, self.augmenter, self.place = cfg, manifest, augmenter, place
        self.epoch, self.start_step, self.in_workers, self.run_long = epoch, start_step, in_workers, run_long
        self.maker = BatchMaker(cfg, manifest, augmenter, place.seed, by_shard=self._by_shard)

    def __iter__(self) -> Iterator[LoaderBatch | LoaderFailure]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.epoch * self.place.steps + self.start_step) % workers
        first, epoch = self.start_step, self.epoch
        try:
            while True:
                yield from self._epoch_batches(epoch, first, logical, workers)
                if not self.run_long:
                    return
                epoch, first = epoch + 1, 0
        except DataError as err:  # handed over as data: a DataLoader would wrap it in a worker traceback
            yield LoaderFailure(str(err))

    def _epoch_batches(self, epoch: int, start_step: int, logical: int, workers: int) -> Iterator[LoaderBatch]:
        """This logical worker's batches of ``epoch`` from ``start_step`` on."""
        steps = self.place.steps
        mine = range((logical - epoch * steps) % workers, steps, workers)  # lazily: an epoch may be very long
        errors: list = []
        done = len(range(mine.start, min(start_step, steps), workers))  # this reader's batches before start_step
        samples = iter(self._samples(epoch, logical, workers, done * (self.cfg.batch_size // self.cfg.pairs_per_clip)))
        self.maker.epoch, self.maker.bad_since = epoch, None
        for step in mine[done:]:
            out = self.maker.batch(samples, errors, step)
            if self.in_workers:
                out.payload, out.staged = stage(self.augmenter, self.maker.codec, out.payload,
                                                  batch_ids(out, self.place.rank)), True
            yield out

    def _samples(self, epoch: int, logical: int, workers: int, skip: int) -> Shuffled:
        """This logical worker's shuffled (pass, sample) stream of ``epoch`` after its first
        ``skip`` items: found by counting (:func:`dataio.reading.streams.seek`) for one corpus read
        once per epoch, by reading past them otherwise."""
        seed, rank, world = self.place.seed, self.place.rank, self.place.world_size
        key, retry = scalar_key(seed, epoch, rank, logical, 7), Retry.of(self.cfg)
        streams = []
        for source, ids in enumerate(self._source_shards()):
            tag = (source,) if source else ()  # one corpus: the numbering of a run without sources
            if self.cfg.resampled:  # every reader draws from every shard, with replacement
                streams.append(resampled_stream(self.manifest, (seed, epoch, rank, logical, 11, *tag), retry, ids))
                continue
            order = [ids[int(i)] for i in np.random.default_rng((seed, epoch, *tag)).permutation(len(ids))]
            split = split_for_reader(order, rank, world, logical, workers)
            rank_seed = (seed, epoch, *tag, *split.order_key)
            if skip and not self.manifest.sources:  # counted to the resume step, not read
                return seek(self.manifest, split, rank_seed, retry, self.cfg.shuffle_buffer, key, skip)
            streams.append(worker_stream(self.manifest, split, rank_seed, retry))
        if len(streams) == 1:
            stream = streams[0]
        else:
            weights = np.array([s.weight for s in self.manifest.sources])
            stream = mixed(streams, weights / weights.sum(), np.random.default_rng((seed, epoch, rank, logical, 13)))
        samples = Shuffled(stream, self.cfg.shuffle_buffer, key, mix_passes=self._by_shard)
        for _ in itertools.islice(iter(samples), skip):
            pass
        return samples

    def _source_shards(self) -> list[list[int]]:
        """The shard ids of each corpus (one list without data.sources)."""
        if not self.manifest.sources:
            return [list(range(len(self.manifest.shards)))]
        ids: list[list[int]] = [[] for _ in self.manifest.sources]
        for sid, shard in enumerate(self.manifest.shards):
            ids[shard.source].append(sid)
        return ids

    @property
    def _by_shard(self) -> bool:
        """Whether passes interleave (resampled draws, mixed corpora): the shuffle buffer
        mixes them and a reader with no usable clip is judged by shards, not passes."""
        return self.cfg.resampled or len(self.manifest.sources) > 1


def batch_ids(batch: LoaderBatch, rank: int) -> BatchIds:
    return BatchIds(indices=batch.indices, draws=batch.draws, epoch=batch.epoch, step=batch.step, rank=rank)


def _libc():
    """The C library (glibc's calls below are no-ops, or raise, elsewhere)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """Ask glibc to serve tensors up to 32 MiB from its heap and to keep freed memory,
    instead of mapping fresh pages for every large tensor and unmapping them when it is
    freed: the augmentation stage allocates a dozen batch-sized temporaries per batch, and
    first-touching new pages (page faults) cost more than the arithmetic on them (about
    2.5x on the stage, measured on this project's CPU machines). No-op off glibc."""
    try:
        libc = _libc()
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 512 << 20))
    except (OSError, AttributeError):
        return False


def _worker_init(_: int, parent: int = 0, threads: int = 1) -> None:
    keep_freed_memory()
    torch.set_num_threads(threads)  # data.worker_threads: one core per worker, the workers are the parallelism
    # a scheduler's SIGTERM and a Ctrl-C go to the whole process group: the trainer handles
    # them (saves a checkpoint, then exits); its loader workers must live until then, and
    # die with it (the DataLoader's workers watch their parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    if parent and os.getppid() != parent:  # it died before the line above took effect
        os._exit(0)


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Linux: this process gets ``sig`` when its parent dies (a trainer killed with -9
    leaves no orphan workers). No-op elsewhere."""
    try:
        libc = _libc()
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def wave_loader(cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, place: Placement, *,
                epoch: int, start_step: int, in_workers: bool, run_long: bool = False) -> DataLoader:
    """A DataLoader over :class:`WaveBatches` (batching happens inside the workers)."""
    dataset = WaveBatches(cfg, manifest, augmenter, place, epoch=epoch, start_step=start_step,
                          in_workers=in_workers, run_long=run_long)
    # a forked worker inherits the parent's OpenMP state but not its thread team: its first
    # multi-threaded op waits forever on threads that are not there. One thread per worker
    # never forms a team; more need workers started fresh (spawn: a second or two each,
    # once per run with persistent workers)
    context = "spawn" if cfg.worker_threads > 1 and cfg.num_workers else None
    if cfg.num_workers:
        check_socket_room("data.num_workers")
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      prefetch_factor=cfg.prefetch if cfg.num_workers else None,
                      persistent_workers=False, pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                      multiprocessing_context=context,
                      worker_init_fn=functools.partial(_worker_init, parent=os.getpid(),
                                                       threads=cfg.worker_threads))


class DeviceFeeder:
    """Moves loader batches to the device as :class:`Batch` es, running the augmentation
    stage there unless the loader workers already did."""

    def __init__(self, augmenter: Augmenter, codec: ClipCodec, place: Placement):
        self.augmenter, self.codec, self.place = augmenter.to(place.device), codec, place

    def __call__(self, loaded: LoaderBatch) -> Batch:
        device = self.place.device
        payload = loaded.payload.to(device, non_blocking=True)
        views = payload if loaded.staged else stage(self.augmenter, self.codec, payload,
                                                    batch_ids(loaded, self.place.rank))
        return Batch(views=views, labels=loaded.labels.to(device, non_blocking=True),
                     indices=loaded.indices.to(device, non_blocking=True), keys=list(loaded.keys),
                     skipped=loaded.skipped, short=loaded.short, sources=loaded.sources.tolist())


class TorchSource(DataSource):
    """The webdataset back end, positioned from the step alone. With
    ``data.persistent_workers`` one loader serves the whole run (its workers start once
    and prepare the next epoch's first batches while this one ends); otherwise a fresh
    loader per epoch. On a CPU training device the loader workers run the augmentation
    stage, in parallel with the training step, instead of the (busy) main process."""

    name = "torch"

    @classmethod
    def open(cls, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
             place: Placement, state=None) -> TorchSource:
        return cls(cfg, manifest, augmenter, place)

    def __init__(self, cfg: DataConfig, manifest: Manifest, augmenter: Augmenter, place: Placement):
        self.cfg, self.manifest, self.augmenter, self.place = cfg, manifest, augmenter, place
        self.in_workers = place.device.type == "cpu" and cfg.num_workers > 0
        self.feed = DeviceFeeder(augmenter, ClipCodec.of(manifest), place)
        self._batches = None
        self._next = None  # (epoch, step) the open loader yields next
        if len(manifest.shards) < place.world_size and place.rank == 0 and not cfg.resampled:
            log.warning("%d shard(s) for %d ranks: every rank reads every shard and keeps its share of "
                        "the clips; re-shard with at least %d shards to read each byte once",
                        len(manifest.shards), place.world_size, place.world_size * max(cfg.num_workers, 1))

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        run_long = self.cfg.persistent_workers and self.cfg.num_workers > 0
        if self._batches is None or self._next != (epoch, start_step):
            self.close()
            self._batches = iter(wave_loader(self.cfg, self.manifest, self.augmenter, self.place, epoch=epoch,
                                             start_step=start_step, in_workers=self.in_workers,
                                             run_long=run_long))
            self._next = (epoch, start_step)
        try:
            for step in range(start_step, self.place.steps):
                loaded = next(self._batches, None)
                if isinstance(loaded, LoaderFailure):
                    raise DataError(f"rank {self.place.rank}: {loaded.message}")
                at = None if loaded is None else (loaded.epoch, loaded.step)
                if at != (epoch, step):
                    got = "its end" if at is None else f"step {at[1]} of epoch {at[0]}"
                    raise DataError(f"rank {self.place.rank}: the loader gave {got} where step {step} of "
                                    f"epoch {epoch} was due")
                self._next = (epoch, step + 1)
                yield self.feed(loaded)
            self._next = (epoch + 1, 0)
        finally:
            if not run_long or self._next != (epoch + 1, 0):
                self.close()  # the epoch was left early (stop, error): no loader is kept for later

    def close(self) -> None:
        """Stop the loader workers now (at interpreter exit they would be joined forever:
        they ignore SIGTERM, which belongs to the trainer)."""
        batches, self._batches, self._next = self._batches, None, None
        if batches is not None and hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()

    def state(self) -> None:
        return None  # the step alone positions it
