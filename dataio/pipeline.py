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
from dataio.manifest import Manifest, load_manifest, load_sources
from dataio.remote import Retry, is_url
from dataio.shard_cache import localize
from dataio.synthetic import SyntheticSource, synthetic_manifest
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


def load_corpus(cfg: DataConfig, frontend: FrontendConfig, retry: Retry, *, share=None,
                is_main: bool = True) -> Manifest:
    """The run's manifest: ``data.sources``, ``data.shards`` or the synthetic corpus. A corpus
    behind URLs is read and checked (a HEAD or a listing per shard) by the main rank alone,
    and ``share(value)`` (the main rank's value on every rank: a broadcast) hands the
    manifest, or the error it met, to the others: once per launch, not W x S requests at
    every start. A local corpus every rank reads itself (its checks are a stat per shard)."""
    def load() -> Manifest:
        if cfg.sources:
            return load_sources(cfg.sources, retry)
        return load_manifest(cfg.shards, retry=retry) if cfg.shards else synthetic_manifest(cfg, frontend)
    remote = any(is_url(s["shards"]) for s in cfg.sources) if cfg.sources else is_url(cfg.shards or "")
    if not remote or share is None:
        return load()
    found = None
    if is_main:
        try:
            found = load()
        except Exception as err:  # noqa: BLE001 -- handed to every rank and raised there alike
            found = err
    found = share(found)
    if isinstance(found, Exception):
        raise found
    return found
