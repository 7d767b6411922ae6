"""The batch type both data back ends produce, the data config, and the back-end switch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dataio.frontend import FrontendConfig, LogMel
from dataio.manifest import Manifest
from dataio.schema import check, option

BACKENDS = ("torch", "dali")


@dataclass
class DataConfig:
    shards: str = option("", "folder holding manifest.json and the training shards")
    backend: str = option("torch", "data back end: torch (webdataset + torchaudio) or dali", BACKENDS)
    batch_size: int = option(64, "clips per rank per step (the global batch is world_size times this)")
    num_workers: int = option(2, "loader worker processes per rank (DALI: CPU threads)")
    num_views: int = option(2, "views drawn from each clip")
    view_seconds: float = option(1.0, "length of one view, seconds")
    pairs_per_clip: int = option(1, "view sets drawn from one decoded clip (long clips pay their decode once)")
    gain_db: float = option(6.0, "random gain of each view, +- dB (0 = off)")
    short_clips: str = option("pad", "clips shorter than a view: zero-padded (at a random offset) or "
                              "skipped (torch back end only); counted either way", ("pad", "skip"))
    shuffle_buffer: int = option(512, "clips held in each worker's shuffle buffer")
    steps_per_epoch: int = option(0, "steps per epoch; 0 = clips // (world_size * batch_size)")

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.num_views >= 2, "num_views", "contrastive views need at least 2")
        check(self.view_seconds > 0, "view_seconds", "must be positive")
        check(self.pairs_per_clip >= 1 and self.batch_size % self.pairs_per_clip == 0, "pairs_per_clip",
              f"must be >= 1 and divide batch_size ({self.batch_size})")
        check(self.gain_db >= 0, "gain_db", "must be >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", "must be >= 0")
        check(not (self.backend == "dali" and self.short_clips == "skip"), "short_clips",
              "'skip' needs backend torch (a DALI batch cannot drop samples); use 'pad'")


class DataError(RuntimeError):
    """The data cannot be read as configured; the message says what to do."""


@dataclass
class Batch:
    """One training batch on the training device.

    views: [B, V, C, F, T] normalised log-mel; labels: [B] int64 (-1 = unlabelled), or
    [B, num_classes] float32 multi-hot when the manifest is multi-label;
    indices: [B] int64 dataset positions (the shards' ``index``); keys: B clip keys;
    skipped: clips that failed to decode (or were too short, with short_clips=skip) while
    this batch was assembled; short: clips in it shorter than a view (zero-padded).
    """

    views: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    keys: list[str]
    skipped: int = 0
    short: int = 0


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


class DeviceFeeder:
    """Moves loader batches to the device as log-mel :class:`Batch` es (computing the
    log-mel there unless the loader workers already did)."""

    def __init__(self, frontend: FrontendConfig, device: torch.device):
        self.device = device
        self.logmel = LogMel(frontend).to(device)

    def __call__(self, wave_batch: dict) -> Batch:
        if "views" in wave_batch:  # the loader workers computed the log-mel already
            views = wave_batch["views"].to(self.device, non_blocking=True)
        else:
            views = self.logmel(wave_batch["waves"].to(self.device, non_blocking=True))
        return Batch(views=views,
                     labels=wave_batch["labels"].to(self.device, non_blocking=True),
                     indices=wave_batch["indices"].to(self.device, non_blocking=True),
                     keys=list(wave_batch["keys"]), skipped=int(wave_batch["skipped"]),
                     short=int(wave_batch["short"]))


def epoch_batches(cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, *, epoch: int,
                  start_step: int, steps: int, rank: int, world_size: int, seed: int,
                  device: torch.device) -> Iterator[Batch]:
    """Batches ``start_step .. steps-1`` of ``epoch`` for ``rank`` from the webdataset back end."""
    from dataio.torch_pipeline import wave_loader

    in_workers = device.type == "cpu" and cfg.num_workers > 0
    loader = wave_loader(cfg, manifest, epoch=epoch, start_step=start_step, steps=steps, rank=rank,
                         world_size=world_size, seed=seed, frontend=frontend if in_workers else None)
    feed = DeviceFeeder(frontend, device)
    for wave_batch in loader:
        yield feed(wave_batch)


class TorchSource:
    """The webdataset back end: a fresh loader per epoch, positioned from the step alone."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, *, rank: int,
                 world_size: int, seed: int, device: torch.device, steps: int):
        self.kwargs = dict(rank=rank, world_size=world_size, seed=seed, device=device, steps=steps)
        self.cfg, self.manifest, self.frontend = cfg, manifest, frontend

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        return epoch_batches(self.cfg, self.manifest, self.frontend, epoch=epoch, start_step=start_step,
                             **self.kwargs)

    def state(self) -> None:
        return None


class DaliSource:
    """The DALI back end: one endless pipeline; its position is DALI's pipeline checkpoint."""

    def __init__(self, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, *, rank: int,
                 world_size: int, seed: int, device: torch.device, steps: int, state: str | None):
        from dataio.dali_pipeline import DaliBatches

        self.steps = steps
        self.batches = DaliBatches(cfg, manifest, frontend, rank=rank, world_size=world_size, seed=seed,
                                   device=device, checkpoint=state)

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        return itertools.islice(self.batches, self.steps - start_step)

    def state(self) -> str:
        return self.batches.state()


def open_source(cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, *, rank: int,
                world_size: int, seed: int, device: torch.device, steps: int, state=None):
    """The configured back end; ``state`` is what its ``state()`` returned at a checkpoint."""
    kwargs = dict(rank=rank, world_size=world_size, seed=seed, device=device, steps=steps)
    if cfg.backend == "dali":
        return DaliSource(cfg, manifest, frontend, state=state, **kwargs)
    return TorchSource(cfg, manifest, frontend, **kwargs)
