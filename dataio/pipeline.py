"""The back-end switch: ``data.backend`` -> the source a run trains from.

The sources yield :class:`dataio.batch.Batch` es through ``epoch(epoch, start_step)``
and report their position with ``state()`` (``None`` when the step alone positions
them). The real ones hand their batches to the same :class:`dataio.augment.Augmenter`.
"""

from __future__ import annotations

from dataio.augment import Augmenter
from dataio.batch import DataConfig, Placement
from dataio.dali_pipeline import DaliSource
from dataio.frontend import FrontendConfig
from dataio.manifest import Manifest
from dataio.remote import Retry
from dataio.shard_cache import localize
from dataio.synthetic import SyntheticSource
from dataio.torch_pipeline import TorchSource


def open_source(cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
                place: Placement, state=None):
    """The configured back end; ``state`` is what its ``state()`` returned at a checkpoint."""
    if cfg.backend == "synthetic":
        return SyntheticSource(cfg, manifest, frontend, augmenter, place)
    if cfg.backend == "dali":
        if manifest.remote:  # DALI's readers open local files: a node-local copy
            manifest = localize(manifest, cfg.cache_dir, cfg.cache_gb, Retry.of(cfg))
        return DaliSource(cfg, manifest, frontend, augmenter, place, state=state)
    return TorchSource(cfg, manifest, augmenter, place)
