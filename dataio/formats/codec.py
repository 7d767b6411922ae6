"""A corpus's clip format with the numbers its members need to be read (:class:`ClipCodec`),
and the helpers every format's batch shares."""

from __future__ import annotations

import dataclasses

import numpy as np
import soundfile as sf

from dataio.formats import clip_format
from dataio.formats.base import ClipFormat
from dataio.formats.logmel import stored_frontend
from dataio.stop_signal import raise_if_stopping


@dataclasses.dataclass(frozen=True)
class ClipCodec:
    """How a corpus's members read: ``clip_format``, the sample rate, and for a mel format
    the bands and the floor (the value a padded frame takes)."""

    clip_format: str = "flac"
    sample_rate: int = 16000
    n_mels: int = 0
    floor_db: float = -60.0

    @classmethod
    def of(cls, manifest) -> ClipCodec:
        if not clip_format(manifest.clip_format).stores_frontend:
            return cls(manifest.clip_format, manifest.sample_rate)
        frontend = stored_frontend(manifest.frontend)
        return cls(manifest.clip_format, manifest.sample_rate, frontend.n_mels, frontend.floor_db)

    @property
    def format(self) -> ClipFormat:
        return clip_format(self.clip_format)

    @property
    def ext(self) -> str:
        return self.format.ext

    @property
    def is_wave(self) -> bool:
        return self.format.is_wave

    def payload(self, rows: int, views: int, size: int) -> np.ndarray:
        """An empty batch payload ``[rows, views, size(, F)]`` of the format's dtype."""
        return self.format.payload(rows, views, size, self.n_mels)

    def open(self, data):
        """The member ``data`` (bytes or a memoryview), opened; ValueError naming what is
        wrong with it."""
        return self.format.open(data, self)

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
        if whole.dtype.kind == "f" and not np.isfinite(whole).all():
            return "non-finite samples" if self.is_wave else "non-finite log-mel values"
        return None


def non_finite_rows(frames: np.ndarray) -> np.ndarray:
    """[N] bool: the float16 rows ``frames`` [N, ...] holding a NaN or an infinity (their
    exponent bits all set), found without converting a value."""
    exponent = frames.view(np.uint16) & 0x7C00
    return exponent.reshape(len(frames), -1).max(axis=1) == 0x7C00


def check_recipe_frontend(frontend, manifest) -> None:
    """ConfigError unless ``frontend`` computes the features of the corpus ``manifest``
    (its format says what that takes)."""
    clip_format(manifest.clip_format).check_frontend(frontend, manifest)
