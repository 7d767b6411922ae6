"""What every clip format answers (:class:`ClipFormat`): callers ask the format, never
compare its name. A new format is one module here and one line in the registry
(:mod:`dataio.formats`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from dataio.errors import ConfigError

PCM_SCALE = 1.0 / 32768.0  # int16 -> float, as libsndfile decodes 16-bit audio

# how a batch of views enters the augmentation chain (dataio.augment.Augmenter.augment)
WAVES = "waves"  # float samples [B, V, S] in [-1, 1): the chain's waveform ops, then the log-mel
DB_FRAMES = "db_frames"  # stored log-mel frames in dB [B, V, T, F]: normalised, then the log-mel ops
MELS = "mels"  # normalised log-mels [B, V, F, T] (computed by the back end): the log-mel ops
ARRIVALS = (WAVES, DB_FRAMES, MELS)


class ClipFormat(ABC):
    """One clip format: what a shard member ``KEY.<ext>`` holds and how it is written,
    opened, batched and handed to the augmentation chain, by either back end.

    Class attributes: ``name`` (the manifest's ``clip_format``), ``ext`` (the member's
    extension), ``domain`` (``wave``: samples the waveform ops can run on; ``mel``: log-mel
    frames computed once with a front end the manifest records), ``compressed``,
    ``lossless_to`` (the formats it converts into without losing a bit), ``dtype`` (one
    element of its batch payload), ``scale`` (a wave format: stored sample -> float in
    [-1, 1)), ``summary`` (a phrase for ``--help``) and ``dali_type`` (the ``nvidia.dali.types``
    name its members are read as)."""

    name: ClassVar[str]
    ext: ClassVar[str]
    summary: ClassVar[str]  # one phrase for --help: what it is, what it costs
    domain: ClassVar[str] = "wave"
    compressed: ClassVar[bool] = False
    lossless_to: ClassVar[frozenset[str]] = frozenset()
    dtype: ClassVar[np.dtype]
    scale: ClassVar[float] = 1.0
    dali_type: ClassVar[str]

    @property
    def is_wave(self) -> bool:
        return self.domain == "wave"

    @property
    def stores_frontend(self) -> bool:
        """Its members are features computed with a front end (the manifest records it)."""
        return self.domain == "mel"

    @property
    def arrives_as(self) -> str:
        """How a torch-back-end batch of it enters the chain (see :data:`ARRIVALS`)."""
        return WAVES if self.is_wave else DB_FRAMES

    # ------------------------------------------------------------ writing
    @abstractmethod
    def encode(self, pcm: np.ndarray, rate: int, logmel=None) -> bytes:
        """The member bytes of int16 samples ``pcm`` [S] at ``rate`` Hz (a mel format
        needs the front end's ``LogMel``)."""

    def manifest_problem(self, record: dict) -> str | None:
        """What a manifest's ``frontend`` record lacks for this format, or None."""
        return None

    def check_frontend(self, frontend, manifest) -> None:
        """ConfigError unless the recipe's ``frontend`` computes the features of the
        corpus ``manifest``: audio at its sample rate (a mel format: every key its
        features depend on)."""
        if manifest.sample_rate != frontend.sample_rate:
            raise ConfigError(f"frontend.sample_rate: {frontend.sample_rate} differs from the shards' "
                              f"{manifest.sample_rate} Hz ({manifest.where})")

    # ------------------------------------------------------------ reading
    @abstractmethod
    def open(self, data, codec):
        """The member ``data`` (bytes or a memoryview) opened as a clip with ``length`` (in
        samples or frames), ``cut(starts, size[, out])`` and ``whole()``; ValueError naming
        what is wrong with it. ``codec`` (:class:`dataio.formats.codec.ClipCodec`) gives the
        corpus's rate and, for a mel format, its bands and floor."""

    def pcm(self, data, codec) -> np.ndarray:
        """A wave member's samples as int16 (what another format is encoded from)."""
        from dataio.formats.clip import to_pcm16

        if not self.is_wave:
            raise ValueError(f"a {self.name} member holds {self.domain} features, not audio")
        whole = self.open(data, codec).whole()
        return whole if whole.dtype == np.int16 else to_pcm16(whole.astype(np.float32) * np.float32(self.scale))

    def payload(self, rows: int, views: int, size: int, n_mels: int = 0) -> np.ndarray:
        """An empty batch payload ``[rows, views, size]`` (a wave format) or ``[rows,
        views, size, n_mels]`` (a mel format)."""
        shape = (rows, views, size) if self.is_wave else (rows, views, size, n_mels)
        return np.empty(shape, dtype=self.dtype)

    def floats(self, samples: np.ndarray) -> np.ndarray:
        """Stored samples (a wave member's ``whole()`` or crops) as float32 in [-1, 1)."""
        return samples.astype(np.float32) * np.float32(self.scale)

    def to_stage(self, payload):
        """A torch-back-end payload (a torch tensor on any device) as the chain takes it:
        float samples for a wave format, the stored dB frames for a mel one."""
        return payload.float() * self.scale if self.is_wave else payload

    # ------------------------------------------------------------ the DALI graph
    def dali_clip(self, member, codec):
        """The DALI node of one clip from its member node: samples or ``[T, F]`` frames
        (time on axis 0)."""
        return member

    def dali_float(self, view, frontend):
        """A cut view node as the chain takes it: float samples (a wave format) or the
        normalised log-mel ``[F, T]`` (a mel format)."""
        from nvidia.dali import fn, types  # deferred: DALI is heavy and optional

        return fn.cast(view, dtype=types.FLOAT) * self.scale
