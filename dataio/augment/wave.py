"""Waveform ops: rows [N, S] float32 in [-1, 1], all batched tensor ops on the rows' device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dataio.augment.base import BuildContext, OpConfig, RateOp, lerp
from dataio.augment.mel import FlipFrames, GainDb, SignBlind
from dataio.augment.sources import NoiseTables, load_impulse_responses, synthetic_impulse_responses
from dataio.schema import check, option

_EPS = 1e-10


def _power(x: torch.Tensor) -> torch.Tensor:
    """Mean power of each row, [N, 1]."""
    return x.pow(2).mean(dim=-1, keepdim=True)


def _read(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [N, S] read at integer positions ``pos`` [N, M]; zero outside."""
    inside = (pos >= 0) & (pos < x.shape[-1])
    return torch.gather(x, 1, pos.clamp(0, x.shape[-1] - 1)) * inside


def _read_linear(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` read at fractional positions ``pos`` (float64) by linear interpolation."""
    left = pos.floor()
    w = (pos - left).to(x.dtype)
    left = left.to(torch.int64)
    return _read(x, left) * (1 - w) + _read(x, left + 1) * w


@dataclass
class Gain(OpConfig):
    """Loudness: the view times 10^(g/20), g uniform in ``db``."""

    db: list[float] = option([-6.0, 6.0], "gain range, dB")
    draws = 1

    ranges = {"db": (-60.0, 60.0)}

    def apply(self, x, u, rows):
        return x * torch.pow(10.0, lerp(self.db, u[:, :1]) / 20.0)

    def logmel_form(self) -> OpConfig:
        """The same loudness change on a stored log-mel: a dB offset (same label, same draws)."""
        return GainDb(op=self.op, p=self.p, views=self.views, per=self.per, db=self.db)


@dataclass
class Polarity(OpConfig):
    """Sign inversion (inaudible in a log-mel alone; matters mixed with other views)."""

    def apply(self, x, u, rows):
        return -x

    def logmel_form(self) -> OpConfig:
        return SignBlind(op=self.op, p=self.p, views=self.views, per=self.per)


@dataclass
class Reverse(OpConfig):
    """Time reversal of the view (an attack becomes a swell)."""

    def apply(self, x, u, rows):
        return x.flip(-1)

    def logmel_form(self) -> OpConfig:
        return FlipFrames(op=self.op, p=self.p, views=self.views, per=self.per)


@dataclass
class Shift(OpConfig):
    """Time shift by s seconds, uniform in ``seconds`` (positive = later), zero-filled."""

    seconds: list[float] = option([-0.1, 0.1], "shift range, seconds")
    draws = 1

    ranges = {"seconds": (-10.0, 10.0)}

    def apply(self, x, u, rows):
        shift = torch.round(lerp(self.seconds, u[:, :1]) * rows.frontend.sample_rate).to(torch.int64)
        pos = torch.arange(x.shape[-1], device=x.device)[None, :] - shift
        return _read(x, pos)


@dataclass
class Mixback(OpConfig):
    """Fonseca et al.'s mix-back on the waveform: a view of another clip of the batch
    (a fresh one for each view) is brought to the view's energy and mixed in with weight
    lambda, uniform in ``weight``. The amplitudes are sqrt(1 - lambda) and
    sqrt(lambda * E_x / E_b), so for uncorrelated sounds the mixture's power spectrum is
    exactly the paper's (1 - lambda) x + lambda (E_x / E_b) b; the view always dominates."""

    weight: list[float] = option([0.0, 0.05], "range of the background's weight lambda")
    draws = 1

    ranges = {"weight": (0.0, 1.0)}

    def apply(self, x, u, rows):
        lam = lerp(self.weight, u[:, :1])
        background = x[rows.partners(self.salt)]
        ex, eb = _power(x), _power(background)
        scale = torch.where(eb > _EPS, torch.sqrt(lam * ex / eb.clamp_min(_EPS)), torch.zeros_like(eb))
        return torch.sqrt(1 - lam) * x + scale * background


@dataclass
class Noise(OpConfig):
    """Additive noise at an SNR uniform in ``snr_db`` (the view's power over the noise's),
    its colour drawn from ``colors``: white, pink (1/f power) or brown (1/f^2). The noise
    is read at a random offset (and sign) from a seeded table per colour, so a view's
    noise is a function of its key like every other draw."""

    snr_db: list[float] = option([10.0, 30.0], "signal-to-noise ratio range, dB")
    colors: list[str] = option(["white", "pink", "brown"], "noise colours to draw from")
    draws = 4
    ranges = {"snr_db": (-30.0, 100.0)}

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.colors) > 0 and set(self.colors) <= set(NoiseTables.COLORS), "colors",
              f"must be a non-empty list of {', '.join(NoiseTables.COLORS)}, got {self.colors!r}")

    def prepare(self, ctx: BuildContext) -> None:
        self.tables = NoiseTables(ctx.seed, ctx.max_samples, self.colors)

    def apply(self, x, u, rows):
        noise = self.tables.read(u[:, 0], u[:, 1], u[:, 2], x.shape[-1], x.device)
        noise = noise - noise.mean(dim=-1, keepdim=True)  # a short read of brown noise drifts
        snr = lerp(self.snr_db, u[:, 3:4])
        return x + noise * torch.sqrt(_power(x) / (torch.pow(10.0, snr / 10.0) * _power(noise).clamp_min(_EPS)))


@dataclass
class Speed(RateOp):
    """Speed change by a factor uniform in ``factor`` (> 1 = faster and higher): the view
    resampled by linear interpolation, as SoundCLR's "random scaling" (pitch and tempo
    together). Needs ``factor[1]`` times the output length as input."""

    factor: list[float] = option([0.8, 1.25], "speed factor range")

    def apply(self, x, u, rows):
        return _read_linear(x, self.positions(u, torch.float64))


@dataclass
class RoomImpulse(OpConfig):
    """Reverberation: the view convolved with a room impulse response and brought back
    to its power. The responses are the audio files of ``folder`` (resampled, mono, cut
    at ``max_seconds``) or, with no folder, ``count`` seeded synthetic rooms: a direct
    path, then exponentially decaying, low-passed noise with RT60 uniform in ``rt60``
    and direct-to-reverberant ratio uniform in ``drr_db``."""

    folder: str = option("", "folder of impulse-response audio files (empty = synthetic rooms)")
    count: int = option(64, "synthetic rooms generated from the run's seed")
    rt60: list[float] = option([0.2, 0.8], "synthetic rooms: reverberation time range, seconds")
    drr_db: list[float] = option([-3.0, 12.0], "synthetic rooms: direct-to-reverberant ratio range, dB")
    max_seconds: float = option(1.0, "impulse responses are cut at this length, seconds")
    draws = 1
    ranges = {"rt60": (0.01, 10.0), "drr_db": (-30.0, 60.0)}

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.count >= 1, "count", "must be >= 1")
        check(0 < self.max_seconds <= 10, "max_seconds", "must be in (0, 10]")

    def prepare(self, ctx: BuildContext) -> None:
        rate = ctx.frontend.sample_rate
        if self.folder:
            self.bank = load_impulse_responses(self.folder, rate, self.max_seconds)
        else:
            self.bank = synthetic_impulse_responses(ctx.seed, self.count, rate, self.rt60, self.drr_db,
                                                    self.max_seconds)
        self._on: dict = {}

    def apply(self, x, u, rows):
        if x.device not in self._on:
            self._on[x.device] = self.bank.to(x.device)
        bank = self._on[x.device]
        pick = (u[:, 0] * len(bank)).to(torch.int64).clamp_max(len(bank) - 1)
        n = 1 << (x.shape[-1] + bank.shape[-1] - 2).bit_length()  # >= the full convolution; a fast FFT size
        spectrum = torch.fft.rfft(x, n=n) * torch.fft.rfft(bank[pick], n=n)
        wet = torch.fft.irfft(spectrum, n=n)[:, :x.shape[-1]]
        return wet * torch.sqrt(_power(x) / _power(wet).clamp_min(_EPS))


@dataclass
class Trim(OpConfig):
    """SoundCLR's silence trim with random padding: the view's leading and trailing
    frames quieter than ``threshold_db`` below its loudest frame are removed and what
    remains is placed at a random offset in the zero-padded view. A silent view is left
    as it is. Place it after ``speed`` (trimming and resampling commute)."""

    threshold_db: float = option(-50.0, "frames this far below the loudest one count as silence, dB")
    frame_ms: float = option(10.0, "frame length of the loudness measure, ms")
    draws = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(-120.0 <= self.threshold_db < 0, "threshold_db", "must be in [-120, 0)")
        check(0 < self.frame_ms <= 1000, "frame_ms", "must be in (0, 1000]")

    def apply(self, x, u, rows):
        n, size = x.shape
        frame = max(1, int(rows.frontend.sample_rate * self.frame_ms / 1000))
        frames = size // frame
        if frames == 0:
            return x
        loud = x[:, :frames * frame].reshape(n, frames, frame).pow(2).mean(-1)
        db = 10 * torch.log10(loud.clamp_min(1e-20))
        on = db >= db.max(dim=1, keepdim=True).values + self.threshold_db
        on &= loud > 1e-20
        idx = torch.arange(frames, device=x.device)
        first = torch.where(on, idx, frames).min(dim=1).values * frame
        last = torch.where(on, idx + 1, 0).max(dim=1).values * frame
        last = torch.where(last == frames * frame, size, last)  # keep the tail the frames did not cover
        silent = ~on.any(dim=1)
        first, length = torch.where(silent, 0, first), torch.where(silent, size, last - first)
        offset = (u[:, 0] * (size - length + 1).to(u.dtype)).to(torch.int64).clamp_max(size - length)
        pos = torch.arange(size, device=x.device)[None, :] - offset[:, None]
        keep = (pos >= 0) & (pos < length[:, None])
        return _read(x, pos + first[:, None]) * keep


WAVE_OPS = {"gain": Gain, "polarity": Polarity, "reverse": Reverse, "shift": Shift, "mixback": Mixback,
            "noise": Noise, "speed": Speed, "rir": RoomImpulse, "trim": Trim}
