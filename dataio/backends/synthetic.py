"""``data.backend: synthetic``: batches of the configured shape, made once on the training
device and handed out again every step at no cost.

It tells an input-bound run from a compute-bound one: the same recipe trains on it at the
speed of the model alone (``audioclr bench train`` compares the two). The views are
seeded noise, one fixed batch per rank; nothing is learned from them. With ``data.shards``
unset, a stand-in manifest of ``data.synthetic_clips`` clips and 10 classes sizes the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from dataio.augment import Augmenter
from dataio.backends.batch import Batch, DataConfig, Placement
from dataio.backends.source import DataSource
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import Manifest

CLASSES = 10


def synthetic_manifest(cfg: DataConfig, frontend: FrontendConfig) -> Manifest:
    """What a run without shards sizes itself by: clips and classes, no files."""
    return Manifest(dataset="synthetic", sample_rate=frontend.sample_rate, num_clips=cfg.synthetic_clips,
                    shards=[], vocabulary=[f"class{i}" for i in range(CLASSES)], root=Path("(synthetic data)"))


class SyntheticSource(DataSource):
    """The same ``[B, V, C, F, T]`` batch on the device every step (labels and indices
    too); ``epoch`` and ``state`` as the real sources have them."""

    name = "synthetic"
    reads_shards = False

    @classmethod
    def open(cls, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
             place: Placement, state=None) -> SyntheticSource:
        return cls(cfg, manifest, frontend, augmenter, place)

    def __init__(self, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
                 place: Placement):
        g = torch.Generator().manual_seed(place.seed * 1009 + place.rank)
        b, v = cfg.batch_size, cfg.num_views
        views = torch.randn(b, v, 1, frontend.n_mels, augmenter.frames, generator=g)
        if frontend.channels > 1:
            views = views.expand(-1, -1, frontend.channels, -1, -1)
        classes = max(len(manifest.vocabulary), 1)
        labels = torch.randint(0, classes, (b,), generator=g)
        if manifest.multi_label:
            labels = torch.nn.functional.one_hot(labels, classes).float()
        indices = (place.rank * b + torch.arange(b)) % max(manifest.num_clips, 1)
        self.batch = Batch(views=views.contiguous().to(place.device), labels=labels.to(place.device),
                           indices=indices.to(place.device), keys=[f"synthetic{i}" for i in range(b)])
        self.place = place

    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        for _ in range(start_step, self.place.steps):
            yield self.batch

    def state(self) -> None:
        return None
