"""The registry of data back ends: ``data.backend`` -> the :class:`dataio.backends.source.DataSource`
a run trains from, and the run's corpus. The real back ends hand their batches to the same
:class:`dataio.augment.Augmenter`.
"""

from __future__ import annotations

from dataio.augment import Augmenter
from dataio.backends.batch import BACKENDS as BACKEND_NAMES
from dataio.backends.batch import DataConfig, Placement
from dataio.backends.dali_pipeline import DaliSource
from dataio.backends.source import DataSource
from dataio.backends.synthetic import SyntheticSource, synthetic_manifest
from dataio.backends.torch_pipeline import TorchSource
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import Manifest, load_manifest, load_sources
from dataio.reading.remote import Retry, is_url

BACKENDS: dict[str, type[DataSource]] = {"torch": TorchSource, "dali": DaliSource, "synthetic": SyntheticSource}
assert tuple(BACKENDS) == BACKEND_NAMES, \
    "dataio.backends.batch.BACKENDS (data.backend's choices) names the registry's back ends"


def backend_class(name: str) -> type[DataSource]:
    return BACKENDS[name]


def open_source(cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
                place: Placement, state=None) -> DataSource:
    """The configured back end; ``state`` is what its ``state()`` returned at a checkpoint."""
    return BACKENDS[cfg.backend].open(cfg, manifest, frontend, augmenter, place, state=state)


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
