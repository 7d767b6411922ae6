"""``flac`` (``KEY.flac``): 16-bit FLAC, decoded at train time. The smallest for tonal
audio and the costliest to read: the decoder runs on a CPU core for every view (DALI's
audio decoder in the DALI graph). Lossless both ways with ``pcm16``."""

from __future__ import annotations

import io

import numpy as np

from dataio.formats.base import PCM_SCALE, ClipFormat
from dataio.formats.clip import to_pcm16


class Flac(ClipFormat):
    name, ext = "flac", "flac"
    summary = "16-bit FLAC, smallest for tonal audio, decoded at train time"
    compressed = True
    lossless_to = frozenset({"pcm16"})
    dtype = np.dtype(np.int16)
    scale = PCM_SCALE
    dali_type = "UINT8"

    def encode(self, pcm: np.ndarray, rate: int, logmel=None) -> bytes:
        import soundfile as sf  # deferred: only what decodes or encodes FLAC needs it

        buffer = io.BytesIO()
        sf.write(buffer, pcm, rate, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()

    def open(self, data, codec) -> FlacClip:
        return FlacClip(data, codec.sample_rate)

    def dali_clip(self, member, codec):
        from nvidia.dali import fn, types  # deferred: DALI is heavy and optional

        audio, _ = fn.decoders.audio(member, dtype=types.FLOAT, downmix=True, sample_rate=codec.sample_rate)
        return audio

    def dali_float(self, view, frontend):
        return view  # the decoder gave float samples already


class FlacClip:
    """A FLAC member: only the frames the crops need are decoded (FLAC seeks)."""

    def __init__(self, data, rate: int):
        import soundfile as sf  # deferred: only what decodes or encodes FLAC needs it

        self.file = sf.SoundFile(io.BytesIO(data))
        if self.file.samplerate != rate:
            raise ValueError(f"audio at {self.file.samplerate} Hz, the manifest says {rate} Hz")
        if self.file.frames == 0:
            raise ValueError("empty audio (0 samples)")
        self.length = self.file.frames

    def _read(self, count: int) -> np.ndarray:
        samples = self.file.read(count, dtype="int16", always_2d=True)
        if samples.shape[1] == 1:
            return samples[:, 0]
        return to_pcm16(samples.mean(axis=1) * PCM_SCALE)  # a foreign multi-channel file, mixed down

    def cut(self, starts, size: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((len(starts), size), dtype=np.int16) if out is None else out
        for i, start in enumerate(starts):
            self.file.seek(max(int(start), 0))
            part = self._read(min(size + min(int(start), 0), self.length))
            offset = max(-int(start), 0)
            out[i, :offset] = 0
            out[i, offset:offset + len(part)] = part[:size - offset]
            out[i, offset + len(part):] = 0
        return out

    def whole(self) -> np.ndarray:
        self.file.seek(0)
        return self._read(self.length)
