"""Log-mel ops: rows [N, F, T] of normalised log-mel (``(dB - norm_mean) / norm_std``),
all batched tensor ops on the rows' device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataio.augment.base import BuildContext, OpConfig, RateOp, lerp
from dataio.augment.sources import NoiseTables
from dataio.frontend import FrontendConfig, hz_to_mel, mel_to_hz
from dataio.schema import option


def _interval_mask(size: int, u: torch.Tensor, count: list[int], width: list[int]) -> torch.Tensor:
    """[N, size] bool: the union of up to ``count[1]`` intervals per row (how many:
    uniform in ``count``), each of a width uniform in ``width`` at a uniform start.
    ``u`` [N, 1 + 2 * count[1]] are the row's draws."""
    most = int(count[1])
    n = u.shape[0]
    k = (count[0] + u[:, 0] * (count[1] - count[0] + 1)).floor().clamp_max(count[1])  # [N]
    w = (width[0] + u[:, 1:1 + most] * (width[1] - width[0] + 1)).floor().clamp(max=min(width[1], size))
    start = (u[:, 1 + most:1 + 2 * most] * (size - w + 1)).floor()
    idx = torch.arange(size, device=u.device, dtype=u.dtype).view(1, 1, size)
    used = torch.arange(most, device=u.device, dtype=u.dtype)[None, :] < k[:, None]
    inside = (idx >= start[..., None]) & (idx < (start + w)[..., None]) & used[..., None]
    return inside.any(dim=1) if most else torch.zeros(n, size, dtype=torch.bool, device=u.device)


def _fill(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "zero":
        return torch.zeros_like(x[:, :1, :1])
    return x.mean(dim=(1, 2), keepdim=True)


@dataclass
class GainDb(OpConfig):
    """``gain`` on a stored log-mel (a logmel corpus): every value raised by g dB, g
    uniform in ``db``, and floored where a quieter wave would have been (the log floor).
    Not listed as an op of its own: the chain turns ``gain`` into it."""

    domain = "mel"
    db: list[float] = option([-6.0, 6.0], "gain range, dB")
    draws = 1

    ranges = {"db": (-60.0, 60.0)}

    def apply(self, x, u, rows):
        fe = rows.frontend
        shifted = x + lerp(self.db, u[:, :1])[:, :, None] / fe.norm_std
        return shifted.clamp_min(fe.normalise(fe.floor_db))


@dataclass
class FlipFrames(OpConfig):
    """``reverse`` on a stored log-mel: the frames in reverse order (the log-mel of the
    reversed wave, but for the window's asymmetry within a frame)."""

    domain = "mel"

    def apply(self, x, u, rows):
        return x.flip(-1)


@dataclass
class SignBlind(OpConfig):
    """``polarity`` on a stored log-mel: a power spectrum cannot hear the sign, so the op
    leaves the log-mel as it is (as it does on audio, alone)."""

    domain = "mel"

    def apply(self, x, u, rows):
        return x


@dataclass
class _Mask(OpConfig):
    count: list[int] = option([1, 2], "how many masks (uniform in the range)")
    width: list[int] = option([0, 20], "width of each mask, bins or frames (uniform in the range)")
    fill: str = option("mean", "masked values become the view's mean, or 0 (= frontend.norm_mean dB)",
                       ("mean", "zero"))

    ranges = {"count": (0, 64, "int"), "width": (0, 10000, "int")}

    @property
    def draws(self) -> int:
        return 1 + 2 * int(self.count[1])


@dataclass
class TimeMask(_Mask):
    """SpecAugment time masking: frames set to the fill value."""

    domain = "mel"

    def apply(self, x, u, rows):
        mask = _interval_mask(x.shape[-1], u, self.count, self.width)[:, None, :]
        return torch.where(mask, _fill(x, self.fill), x)


@dataclass
class FreqMask(_Mask):
    """SpecAugment frequency masking: mel bands set to the fill value."""

    domain = "mel"
    width: list[int] = option([0, 8], "width of each mask, mel bands (uniform in the range)")

    def apply(self, x, u, rows):
        mask = _interval_mask(x.shape[-2], u, self.count, self.width)[:, :, None]
        return torch.where(mask, _fill(x, self.fill), x)


def _resample_axes(x: torch.Tensor, f_pos: torch.Tensor, t_pos: torch.Tensor) -> torch.Tensor:
    """x [N, F, T] read at fractional bin positions f_pos [N, F'] and frame positions
    t_pos [N, T'] (bilinear; positions clamped to the edges) -> [N, F', T']."""
    n, nf, nt = x.shape
    grid_t = (2 * t_pos + 1) / nt - 1  # align_corners=False coordinates
    grid_f = (2 * f_pos + 1) / nf - 1
    grid = torch.stack(torch.broadcast_tensors(grid_t[:, None, :], grid_f[:, :, None]), dim=-1)
    out = F.grid_sample(x[:, None], grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0]


@dataclass
class RandomResizedCrop(OpConfig):
    """Random resized crop of the log-mel patch: a box keeping a fraction (uniform in
    ``time_scale`` / ``freq_scale``) of the frames and bands, at a uniform position,
    stretched back to the full patch (bilinear). Mild crops act as a small stretch in
    time and a small transposition in frequency (Fonseca et al.)."""

    domain = "mel"
    time_scale: list[float] = option([0.6, 1.0], "fraction of the frames the box keeps")
    freq_scale: list[float] = option([0.6, 1.0], "fraction of the mel bands the box keeps")
    draws = 4

    ranges = {"time_scale": (0.05, 1.0), "freq_scale": (0.05, 1.0)}

    def apply(self, x, u, rows):
        n, nf, nt = x.shape
        st, sf = lerp(self.time_scale, u[:, 0:1]), lerp(self.freq_scale, u[:, 1:2])
        t0, f0 = u[:, 2:3] * (1 - st) * nt, u[:, 3:4] * (1 - sf) * nf
        t_pos = t0 + (torch.arange(nt, device=x.device)[None, :] + 0.5) * st - 0.5
        f_pos = f0 + (torch.arange(nf, device=x.device)[None, :] + 0.5) * sf - 0.5
        return _resample_axes(x, f_pos, t_pos)


@dataclass
class Compress(OpConfig):
    """Fonseca et al.'s compression, a contrast adjustment of the log-mel patch: values
    pulled towards (factor < 1) or pushed from (> 1) the patch mean, factor uniform in
    ``factor``. On a dB scale this is a dynamic-range compressor around the mean level."""

    domain = "mel"
    factor: list[float] = option([0.7, 1.0], "contrast factor range (1 = unchanged)")
    draws = 1

    ranges = {"factor": (0.0, 4.0)}

    def apply(self, x, u, rows):
        mean = x.mean(dim=(1, 2), keepdim=True)
        return mean + lerp(self.factor, u[:, :1])[:, :, None] * (x - mean)


@dataclass
class MelNoise(OpConfig):
    """Additive Gaussian noise on the normalised log-mel, std uniform in ``std`` (in
    units of frontend.norm_std dB), read from a seeded table at a random offset."""

    domain = "mel"
    std: list[float] = option([0.0, 0.1], "noise standard deviation range (normalised log-mel units)")
    draws = 3

    ranges = {"std": (0.0, 10.0)}

    def prepare(self, ctx: BuildContext) -> None:
        self.tables = NoiseTables(ctx.seed + 1, 1 << 16, ["normal"])

    def apply(self, x, u, rows):
        n, nf, nt = x.shape
        noise = self.tables.read(torch.zeros_like(u[:, 0]), u[:, 0], u[:, 1], nf * nt, x.device)
        return x + lerp(self.std, u[:, 2:3])[:, :, None] * noise.view(n, nf, nt)


@dataclass
class MelMixback(OpConfig):
    """Fonseca et al.'s mix-back exactly as written, on the linear mel power of the
    patch: x_m = (1 - lambda) x + lambda (E(x) / E(b)) b, b another clip's patch (a fresh
    one per view), E the patch energy, lambda uniform in ``weight``; back to log-mel."""

    domain = "mel"
    weight: list[float] = option([0.0, 0.05], "range of the background's weight lambda")
    draws = 1

    ranges = {"weight": (0.0, 1.0)}

    def apply(self, x, u, rows):
        fe = rows.frontend
        power = torch.pow(10.0, (x * fe.norm_std + fe.norm_mean) / 10.0)
        background = power[rows.partners(self.salt)]
        ex, eb = power.sum(dim=(1, 2), keepdim=True), background.sum(dim=(1, 2), keepdim=True)
        lam = lerp(self.weight, u[:, :1])[:, :, None]
        mixed = (1 - lam) * power + lam * (ex / eb) * background
        return (10.0 * torch.log10(mixed.clamp_min(fe.log_floor)) - fe.norm_mean) / fe.norm_std


@dataclass
class TimeStretch(RateOp):
    """Tempo change without pitch change: the log-mel's frames resampled by a factor
    uniform in ``factor`` (> 1 = faster). Needs ``factor[1]`` times the output frames."""

    domain = "mel"
    factor: list[float] = option([0.9, 1.1], "tempo factor range")

    def apply(self, x, u, rows):
        n, nf, nt = x.shape
        f_pos = torch.arange(nf, device=x.device, dtype=x.dtype)[None, :].expand(n, nf)
        return _resample_axes(x, f_pos, self.positions(u, x.dtype))


def _mel_span(fe: FrontendConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest mel band edges of ``fe``, in mels (float64)."""
    edges = torch.tensor([float(fe.f_min), float(fe.f_max or fe.sample_rate / 2)], dtype=torch.float64)
    lo, hi = hz_to_mel(edges, fe.mel_scale)
    return lo, hi


def mel_band_position(hz: torch.Tensor, fe: FrontendConfig) -> torch.Tensor:
    """Fractional mel-band index (0 = the lowest band's centre) of frequencies ``hz``."""
    lo, hi = _mel_span(fe)
    step = (hi - lo) / (fe.n_mels + 1)
    return (hz_to_mel(hz.to(torch.float64), fe.mel_scale) - lo) / step - 1


@dataclass
class PitchShift(OpConfig):
    """Transposition by s semitones, uniform in ``semitones``, at constant tempo: each mel
    band reads the band at 2^(-s/12) times its centre frequency (linear interpolation
    between bands); bands with no source below them take the patch minimum."""

    domain = "mel"
    semitones: list[float] = option([-2.0, 2.0], "transposition range, semitones")
    draws = 1

    ranges = {"semitones": (-24.0, 24.0)}

    def prepare(self, ctx: BuildContext) -> None:
        fe = ctx.frontend
        self._centres = _band_centres(fe)

    def apply(self, x, u, rows):
        n, nf, nt = x.shape
        ratio = torch.pow(2.0, -lerp(self.semitones, u[:, :1]).to(torch.float64) / 12.0)
        src = mel_band_position(self._centres.to(x.device)[None, :] * ratio, rows.frontend)
        floor = x.amin(dim=(1, 2), keepdim=True)
        below = (src < -0.5)[:, :, None]
        t_pos = torch.arange(nt, device=x.device, dtype=x.dtype)[None, :].expand(n, nt)
        out = _resample_axes(x, src.to(x.dtype), t_pos)
        return torch.where(below | (src > nf - 0.5)[:, :, None], floor, out)


def _band_centres(fe: FrontendConfig) -> torch.Tensor:
    """Centre frequency of each mel band, Hz [F] (float64)."""
    lo, hi = _mel_span(fe)
    mels = lo + (hi - lo) * torch.arange(1, fe.n_mels + 1, dtype=torch.float64) / (fe.n_mels + 1)
    return mel_to_hz(mels, fe.mel_scale)


MEL_OPS = {"time_mask": TimeMask, "freq_mask": FreqMask, "rrc": RandomResizedCrop, "compress": Compress,
           "mel_noise": MelNoise, "mel_mixback": MelMixback, "time_stretch": TimeStretch,
           "pitch_shift": PitchShift}
