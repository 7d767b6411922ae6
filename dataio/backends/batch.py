"""The contract both data back ends keep: the data config, the batch they yield, where
a source sits (rank, world size, seed, device, steps), and the error they raise.

No back end imports the dispatcher (:mod:`dataio.backends.registry`); both import this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dataio.reading.manifest import Manifest
from dataio.schema import check, coerce, option

BACKENDS = ("torch", "dali", "synthetic")


@dataclass
class DataConfig:
    shards: str = option("", "folder holding manifest.json and the training shards, or its URL (http(s)://, "
                         "s3://, gs://, any fsspec URL: streamed, see docs/data-and-formats.md)")
    sources: list[dict] = option([], "several corpora in one run, instead of shards: a list of {shards: folder or "
                                 "URL, weight: share of the clips drawn from it (default 1), name: for the per-corpus "
                                 "counts (default its manifest's dataset)}; an epoch counts the clips of all of them")
    remote_attempts: int = option(6, "shards behind a URL: tries of a read that fails on the way (reset, timeout, "
                                  "5xx) before the run stops naming it; back-off 0.5 s doubling to 8 s")
    remote_timeout: float = option(30.0, "shards behind a URL: seconds one request may wait for the server")
    cache_dir: str = option("", "backend dali with shards behind a URL: the node-local folder the corpus is "
                            "fetched into once per node ('' = $AUDIOCLR_CACHE or ~/.cache/audioclr/shards)")
    cache_gb: float = option(100.0, "the most that folder holds; corpora used longest ago are evicted first")
    backend: str = option("torch", "data back end: torch (webdataset + torchaudio), dali, or synthetic (one "
                          "fixed batch on the device every step: the model's speed without input)", BACKENDS)
    batch_size: int = option(64, "clips per rank per step (the global batch is world_size times this)")
    num_workers: int = option(2, "loader worker processes per rank (DALI: CPU threads)")
    prefetch: int = option(2, "batches each loader worker keeps ready (DALI: the pipeline's queue depth)")
    persistent_workers: bool = option(True, "torch back end: one loader for the whole run, its workers preparing "
                                      "the next epoch while this one ends (false: fresh workers every epoch)")
    worker_threads: int = option(1, "torch back end: CPU threads of each loader worker (the workers are the "
                                 "parallelism; more only helps with fewer workers than cores)")
    pin_memory: bool = option(True, "torch back end on a GPU: batches in page-locked host memory, copied to the "
                              "device without blocking the step")
    num_views: int = option(2, "views drawn from each clip")
    view_seconds: float = option(1.0, "length of one view, seconds")
    view_gap: float = option(0.0, "the views of a clip start at least this far apart, seconds, where the "
                             "clip is long enough (as far apart as it allows otherwise); 0 = independent")
    pairs_per_clip: int = option(1, "view sets drawn from one decoded clip (long clips pay their decode once)")
    short_clips: str = option("pad", "clips shorter than a view: zero-padded (at a random offset) or "
                              "skipped (torch back end only); counted either way", ("pad", "skip"))
    shuffle_buffer: int = option(512, "clips held in each worker's shuffle buffer")
    resampled: bool = option(False, "torch back end: every loader worker of every rank draws whole shards with "
                             "replacement from all of them (an epoch is counted in clips), so any number of ranks x "
                             "workers trains on any number of shards; false: each clip once per epoch")
    steps_per_epoch: int = option(0, "steps per epoch; 0 = clips // (world_size * batch_size)")
    synthetic_clips: int = option(100_000, "backend synthetic without shards: the clips an epoch counts")

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.prefetch >= 1, "prefetch", "must be >= 1")
        self._check_sources()
        check(self.remote_attempts >= 1, "remote_attempts", "must be >= 1")
        check(self.remote_timeout > 0, "remote_timeout", "must be positive")
        check(self.cache_gb > 0, "cache_gb", "must be positive")
        check(self.worker_threads >= 1, "worker_threads", "must be >= 1")
        check(self.num_views >= 2, "num_views", "contrastive views need at least 2")
        check(0 < self.view_seconds <= 600, "view_seconds", "must be in (0, 600] seconds")
        check(0 <= self.view_gap <= 600, "view_gap", "must be in [0, 600] seconds")
        check(self.pairs_per_clip >= 1 and self.batch_size % self.pairs_per_clip == 0, "pairs_per_clip",
              f"must be >= 1 and divide batch_size ({self.batch_size})")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", "must be >= 0")
        check(self.synthetic_clips > 0, "synthetic_clips", "must be positive")


    def _check_sources(self) -> None:
        if not self.sources:
            return
        check(not self.shards, "sources", "give data.shards or data.sources, not both")
        seen: set = set()
        for i, source in enumerate(self.sources):
            key = f"sources[{i}]"
            check(isinstance(source, dict) and bool(source.get("shards")), key,
                  "needs a mapping with shards: FOLDER_OR_URL (and optionally weight, name)")
            unknown = sorted(set(source) - {"shards", "weight", "name"})
            check(not unknown, key, f"unknown key(s) {', '.join(unknown)} (valid: shards, weight, name)")
            weight = coerce(source.get("weight", 1.0), float, f"{key}.weight")
            check(weight > 0, f"{key}.weight", f"must be a positive number, not {weight:g}")
            source["weight"] = weight
            where = str(source["shards"]).rstrip("/")
            check(where not in seen, key, f"{source['shards']} is listed twice")
            seen.add(where)


@dataclass
class Batch:
    """One training batch on the training device.

    views: [B, V, C, F, T] normalised log-mel, augmented; labels: [B] int64 (-1 =
    unlabelled), or [B, num_classes] float32 multi-hot when the manifest is multi-label;
    indices: [B] int64 dataset positions (the shards' ``index``); keys: B clip keys;
    skipped: clips that failed to decode (or were too short, with short_clips=skip) while
    this batch was assembled; short: clips in it shorter than a view (zero-padded);
    sources: with several corpora, how many of its clips each gave.
    """

    views: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    keys: list[str]
    skipped: int = 0
    short: int = 0
    sources: list[int] | None = None  # with data.sources: clips of each corpus in this batch


@dataclass
class LoaderBatch:
    """One batch as a loader worker hands it to the training process, on the CPU.

    payload: the clips' crops, int16 samples [B, V, S] or float16 dB frames [B, V, T, F],
    or, when ``staged``, the augmentation stage's views [B, V, C, F, T] (computed in the
    worker); labels, indices, keys, skipped, short as :class:`Batch` has them; draws: [B]
    each view set's draw number (the keyed augmentation reads it with ``epoch``, ``step``);
    sources: [S] int64 clips of each corpus (empty with one corpus)."""

    payload: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    draws: torch.Tensor
    keys: list[str]
    epoch: int
    step: int
    skipped: int
    short: int
    sources: torch.Tensor
    staged: bool = False

    def pin_memory(self) -> LoaderBatch:
        """The same batch in pinned memory (the DataLoader's ``pin_memory`` calls this)."""
        return dataclasses.replace(self, **{f: getattr(self, f).pin_memory() for f in
                                            ("payload", "labels", "indices", "draws", "sources")})


@dataclass
class LoaderFailure:
    """What a loader worker hands over instead of a batch when its data cannot go on (a
    DataLoader would wrap a raised error in a worker traceback): the message, raised as
    :class:`dataio.errors.DataError` in the training process."""

    message: str


@dataclass
class Placement:
    """Where a data source runs: its rank among ``world_size``, the run's seed, the
    training device, and the steps every rank runs per epoch."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: torch.device = torch.device("cpu")
    steps: int = 1


def steps_per_epoch(cfg: DataConfig, manifest: Manifest, world_size: int) -> int:
    """Steps every rank runs per epoch: the same number on all ranks, from the manifest
    alone, so no rank waits on another that ran out of data."""
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    clips_per_step = world_size * cfg.batch_size // cfg.pairs_per_clip
    steps = manifest.num_clips // clips_per_step
    check(steps > 0, "data.batch_size", f"{world_size} rank(s) x {cfg.batch_size // cfg.pairs_per_clip} "
          f"clips exceeds the {manifest.num_clips} clips of {manifest.root}: lower the batch size")
    return steps
