"""What a data back end is (``data.backend``), behind one interface, as the engines are.

Before it is opened, a back end's class answers for itself: which data settings it refuses
(:meth:`DataSource.check`, raising ConfigError by key) and whether the position it saves
at a checkpoint holds at another world size. Opened (:meth:`DataSource.open`), it yields
:class:`dataio.backends.batch.Batch` es for ``epoch(epoch, start_step)``, reports its position
with ``state()`` (``None`` when the step alone positions it) and releases what it holds
with ``close()``. ``dataio.backends.registry`` holds the registry; ``torch_pipeline``,
``dali_pipeline`` and ``synthetic`` the three back ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from dataio.augment import Augmenter
from dataio.backends.batch import Batch, DataConfig, Placement
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import Manifest


class DataSource(ABC):
    """The interface; each back end fills it in."""

    name = ""
    reads_shards = True  # it trains from data.shards or data.sources (not from nothing)
    position_holds_at_any_world_size = True  # its saved state() resumes at another world size

    @classmethod
    def check(cls, cfg: DataConfig) -> None:
        """Refuse (ConfigError naming the ``data.*`` key) what this back end cannot read."""
        return None  # a back end that reads every setting

    @classmethod
    @abstractmethod
    def open(cls, cfg: DataConfig, manifest: Manifest, frontend: FrontendConfig, augmenter: Augmenter,
             place: Placement, state=None) -> DataSource:
        """The source of a run; ``state``: what its ``state()`` returned at a checkpoint."""

    @abstractmethod
    def epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        """The batches of steps ``start_step ..`` of ``epoch``."""

    def state(self):
        """The position to save at a checkpoint (None: the step alone positions it)."""
        return None

    def close(self) -> None:
        """Stop what the source runs (loader workers, pipelines) now."""
        return None  # a source that runs nothing of its own
