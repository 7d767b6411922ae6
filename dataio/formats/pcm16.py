"""``pcm16`` (``KEY.pcm``): 16-bit samples, little-endian, no header. Reading a view is a
slice of the member's bytes; lossless both ways with ``flac``."""

from __future__ import annotations

import numpy as np

from dataio.formats.base import PCM_SCALE, ClipFormat
from dataio.formats.clip import Clip, samples_of


class Pcm16(ClipFormat):
    name, ext = "pcm16", "pcm"
    summary = "the same samples raw: twice FLAC's size on tonal audio, read with no decoder"
    lossless_to = frozenset({"flac"})
    dtype = np.dtype(np.int16)
    scale = PCM_SCALE
    dali_type = "INT16"

    def encode(self, pcm: np.ndarray, rate: int, logmel=None) -> bytes:
        return pcm.astype("<i2").tobytes()

    def open(self, data, codec) -> Clip:
        return samples_of(data, "<i2", self.name)
