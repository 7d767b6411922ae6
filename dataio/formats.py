"""What a shard member holds: the three clip formats, their codecs, and the front end a
logmel corpus was computed with.

- ``flac`` (``KEY.flac``): 16-bit FLAC, decoded at train time (smallest for tonal audio,
  the costliest to read: the decoder runs on a CPU core for every view).
- ``pcm16`` (``KEY.pcm``): the same 16-bit samples, little-endian, no header: reading a
  view is a slice of the member's bytes. Lossless both ways with ``flac``.
- ``logmel`` (``KEY.mel``): the clip's log-mel in dB as float16 frames ``[T, F]``
  (frame-major, so a view is a contiguous byte range), computed once with the front end
  the manifest records. No waveform op can run on it; normalisation is applied at
  train time, so ``frontend.norm_mean``/``norm_std`` stay free.

Every format reads into the same two batch payloads: int16 samples (``flac``,
``pcm16``; the device scales them by 1/32768, exactly what the FLAC decoder gives) or
float16 dB frames (``logmel``).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import soundfile as sf
import torch

from dataio.errors import ConfigError
from dataio.frontend import FrontendConfig, LogMel
from dataio.manifest import CLIP_FORMATS, MEMBER_EXT, STORED_FRONTEND, frontend_record
from dataio.stop_signal import raise_if_stopping
from dataio.views import cut

__all__ = ["CLIP_FORMATS", "MEMBER_EXT", "STORED_FRONTEND", "ClipCodec", "check_recipe_frontend", "encode_member",
           "frontend_differences", "non_finite_rows",
           "logmel_frames", "pcm_to_float", "stored_frontend", "to_pcm16"]

WAVE_FORMATS = ("flac", "pcm16")
PCM_SCALE = 1.0 / 32768.0  # int16 -> float, as libsndfile decodes 16-bit audio





def frontend_differences(frontend: FrontendConfig, record: dict) -> list[str]:
    """``frontend.KEY: the recipe has A, the corpus B`` for each key where ``frontend``
    would compute other features than a corpus computed with ``record``."""
    mine = frontend_record(frontend)
    return [f"frontend.{key}: the recipe has {mine[key]!r}, the corpus {record.get(key)!r}"
            for key in STORED_FRONTEND if mine[key] != record.get(key)]


def check_recipe_frontend(frontend: FrontendConfig, manifest) -> None:
    """ConfigError unless ``frontend`` computes the features of the corpus ``manifest``:
    its sample rate, and for a logmel corpus every key its log-mels depend on."""
    if manifest.clip_format == "logmel":
        wrong = frontend_differences(frontend, manifest.frontend)
        if wrong:
            raise ConfigError(f"{manifest.where} is a logmel corpus computed with another front end than the "
                              f"recipe's: {'; '.join(wrong)}. Set the recipe's frontend to the corpus's, or "
                              f"convert a flac or pcm16 corpus with this front end (`audioclr shard convert`)")
    elif manifest.sample_rate != frontend.sample_rate:
        raise ConfigError(f"frontend.sample_rate: {frontend.sample_rate} differs from the shards' "
                          f"{manifest.sample_rate} Hz ({manifest.where})")


def stored_frontend(record: dict) -> FrontendConfig:
    """The FrontendConfig of a manifest's frontend record."""
    return FrontendConfig(**{key: record[key] for key in STORED_FRONTEND})


def to_pcm16(mono: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 (clipped, rounded): what 16-bit FLAC keeps."""
    return np.clip(np.rint(np.clip(mono, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)


def logmel_frames(pcm: np.ndarray, frontend: FrontendConfig, logmel: LogMel | None = None) -> np.ndarray:
    """float16 dB frames ``[T, F]`` of int16 samples ``pcm`` [S] (T = S // hop + 1); a clip
    shorter than half an FFT is zero-padded to it first (the centred frames reflect it)."""
    logmel = logmel or LogMel(frontend)
    wave = torch.from_numpy(pcm.astype(np.float32) * np.float32(PCM_SCALE))
    frames = frontend.num_frames(len(wave))
    if len(wave) <= frontend.fft_size // 2:
        wave = torch.nn.functional.pad(wave, (0, frontend.fft_size // 2 + 1 - len(wave)))
    return logmel.db(wave[None])[0, :, :frames].T.numpy().astype(np.float16)


def encode_member(pcm: np.ndarray, rate: int, clip_format: str, logmel: LogMel | None = None) -> bytes:
    """The member bytes of int16 samples ``pcm`` [S] at ``rate`` Hz in ``clip_format``
    (``logmel`` needs the front end's :class:`LogMel`)."""
    if clip_format == "flac":
        buffer = io.BytesIO()
        sf.write(buffer, pcm, rate, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()
    if clip_format == "pcm16":
        return pcm.astype("<i2").tobytes()
    if clip_format == "logmel":
        return logmel_frames(pcm, logmel.cfg, logmel).tobytes()
    raise ValueError(f"unknown clip format {clip_format!r}: one of {', '.join(CLIP_FORMATS)}")


class Clip:
    """One member, opened: its ``length`` (samples, or frames for a log-mel) and
    ``cut(starts, size[, out])``, the crops at ``starts`` (int16 [n, size] samples, or
    float16 [n, size, F] dB frames), padded with silence where a crop leaves the clip."""

    def __init__(self, data: np.ndarray, fill=0):
        self.data, self.fill, self.length = data, fill, len(data)

    def cut(self, starts, size: int, out: np.ndarray | None = None) -> np.ndarray:
        return cut(self.data, starts, size, self.fill, out)

    def whole(self) -> np.ndarray:
        return self.data


class FlacClip:
    """A FLAC member: only the frames the crops need are decoded (FLAC seeks)."""

    def __init__(self, data, rate: int):
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


@dataclasses.dataclass(frozen=True)
class ClipCodec:
    """How a corpus's members read: ``clip_format``, the sample rate, and for ``logmel``
    the bands and the floor (the value a padded frame takes)."""

    clip_format: str = "flac"
    sample_rate: int = 16000
    n_mels: int = 0
    floor_db: float = -60.0

    @classmethod
    def of(cls, manifest) -> ClipCodec:
        if manifest.clip_format != "logmel":
            return cls(manifest.clip_format, manifest.sample_rate)
        frontend = stored_frontend(manifest.frontend)
        return cls("logmel", manifest.sample_rate, frontend.n_mels, frontend.floor_db)

    @property
    def ext(self) -> str:
        return MEMBER_EXT[self.clip_format]

    @property
    def is_wave(self) -> bool:
        return self.clip_format in WAVE_FORMATS

    def payload(self, rows: int, views: int, size: int) -> np.ndarray:
        """An empty batch payload ``[rows, views, size(, F)]``: int16 samples, or float16
        dB frames."""
        if self.is_wave:
            return np.empty((rows, views, size), dtype=np.int16)
        return np.empty((rows, views, size, self.n_mels), dtype=np.float16)


    def open(self, data) -> Clip | FlacClip:
        """The member ``data`` (bytes or a memoryview), opened; ValueError naming what is
        wrong with it."""
        if self.clip_format == "flac":
            return FlacClip(data, self.sample_rate)
        if self.clip_format == "pcm16":
            if len(data) % 2 or not len(data):
                raise ValueError(f"pcm16 member of {len(data)} bytes: 16-bit samples need a positive, even "
                                 f"byte count")
            return Clip(np.frombuffer(data, dtype="<i2"))
        row = 2 * self.n_mels
        if len(data) % row or not len(data):
            raise ValueError(f"logmel member of {len(data)} bytes: not a whole number of {self.n_mels}-band "
                             f"float16 frames ({row} bytes each)")
        return Clip(np.frombuffer(data, dtype="<f2").reshape(-1, self.n_mels), fill=np.float16(self.floor_db))

    def problem(self, data) -> str | None:
        """What is wrong with a member, or None: it does not decode, is empty, at another
        rate, not a whole number of samples or frames, or not finite (check-shards)."""
        try:
            whole = self.open(data).whole()
        except sf.LibsndfileError as err:
            raise_if_stopping()  # a stop inside the decoder is not a finding about the member
            return f"audio does not decode: {err.error_string}"
        except ValueError as err:  # what open() found wrong: it says so itself
            return str(err)
        except Exception as err:  # noqa: BLE001 -- every way a member fails to read is a finding
            raise_if_stopping()
            return f"{self.clip_format} member does not read: {type(err).__name__}: {err}"
        if not self.is_wave and not np.isfinite(whole).all():
            return "non-finite log-mel values"
        return None


def non_finite_rows(frames: np.ndarray) -> np.ndarray:
    """[N] bool: the float16 rows ``frames`` [N, ...] holding a NaN or an infinity (their
    exponent bits all set), found without converting a value."""
    exponent = frames.view(np.uint16) & 0x7C00
    return exponent.reshape(len(frames), -1).max(axis=1) == 0x7C00


def pcm_to_float(waves: torch.Tensor) -> torch.Tensor:
    """int16 samples -> float32 in [-1, 1) (the FLAC decoder's numbers, bit for bit)."""
    return waves.float() * PCM_SCALE
