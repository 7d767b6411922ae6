"""The log-mel front end: one config, computed on the training device.

``FrontendConfig`` is the single description of the features (saved with every exported
encoder); :class:`LogMel` computes them with torchaudio on whatever device the batch is on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torchaudio

from dataio.schema import check, option


@dataclass
class FrontendConfig:
    sample_rate: int = option(16000, "sample rate of the waveforms, Hz")
    win_ms: float = option(25.0, "analysis window length, milliseconds")
    hop_ms: float = option(10.0, "hop between frames, milliseconds")
    n_fft: int = option(0, "FFT size in samples; 0 = the next power of two >= the window")
    window: str = option("hann", "analysis window (periodic)", ("hann", "hamming"))
    n_mels: int = option(64, "number of mel bands")
    f_min: float = option(50.0, "lowest mel band edge, Hz")
    f_max: float = option(0.0, "highest mel band edge, Hz; 0 = sample_rate / 2")
    mel_scale: str = option("slaney", "mel scale formula", ("htk", "slaney"))
    log_floor: float = option(1e-6, "power floor before the log (1e-6 = -60 dB)")
    norm_mean: float = option(-35.0, "dB value subtracted from the log-mel")
    norm_std: float = option(20.0, "dB value the centred log-mel is divided by")
    channels: int = option(1, "input channels of the encoder (log-mel replicated to each)")

    def __post_init__(self) -> None:
        check(0 < self.sample_rate <= 384_000, "sample_rate", "must be in (0, 384000] Hz")
        check(0 < self.win_ms <= 1000, "win_ms", "must be in (0, 1000] (a window of at most a second)")
        check(0 < self.hop_ms <= self.win_ms, "hop_ms", "must be in (0, win_ms]")
        check(self.win_length >= 2, "win_ms", "gives a window of fewer than 2 samples at this sample_rate")
        check(self.n_mels > 0, "n_mels", "must be positive")
        check(self.f_max == 0 or self.f_min < self.f_max <= self.sample_rate / 2, "f_max",
              "must be 0 or in (f_min, sample_rate / 2]")
        check(self.log_floor > 0, "log_floor", "must be positive")
        check(self.norm_std > 0, "norm_std", "must be positive")
        check(self.channels in (1, 3), "channels", "must be 1 or 3")
        check(self.n_fft == 0 or self.n_fft >= self.win_length, "n_fft", "must be >= the window")

    @property
    def win_length(self) -> int:
        """Window length in samples."""
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        """Hop length in samples."""
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def fft_size(self) -> int:
        return self.n_fft or 2 ** math.ceil(math.log2(self.win_length))

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples (centred frames)."""
        return num_samples // self.hop_length + 1

    @property
    def floor_db(self) -> float:
        """The log-mel's lowest value, dB (silence, and the padding of a short clip)."""
        return 10.0 * math.log10(self.log_floor)

    def normalise(self, db):
        """dB values (a tensor or a number) -> the features the encoder sees."""
        return (db - self.norm_mean) / self.norm_std


WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window}

# the mel scales of torchaudio's MelSpectrogram (what LogMel computes), on tensors
_SLANEY_SP, _SLANEY_LOGSTEP = 200.0 / 3, math.log(6.4) / 27.0  # Hz per mel below 1 kHz; log step above
_SLANEY_HZ = 1000.0  # where the slaney scale turns from linear to log
_SLANEY_MEL = _SLANEY_HZ / _SLANEY_SP


def hz_to_mel(hz: torch.Tensor, scale: str) -> torch.Tensor:
    """Frequencies in Hz -> mels on ``scale`` (htk or slaney), as the front end's filter bank."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    return torch.where(hz >= _SLANEY_HZ, _SLANEY_MEL + torch.log(hz.clamp_min(1e-9) / _SLANEY_HZ) / _SLANEY_LOGSTEP,
                       hz / _SLANEY_SP)


def mel_to_hz(mel: torch.Tensor, scale: str) -> torch.Tensor:
    """Mels on ``scale`` -> Hz, the inverse of :func:`hz_to_mel`."""
    if scale == "htk":
        return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)
    return torch.where(mel >= _SLANEY_MEL, _SLANEY_HZ * torch.exp(_SLANEY_LOGSTEP * (mel - _SLANEY_MEL)),
                       _SLANEY_SP * mel)


def analysis_window(cfg: FrontendConfig) -> torch.Tensor:
    """The periodic analysis window of ``cfg``, float64 [win_length] (both front ends use it)."""
    return WINDOWS[cfg.window](cfg.win_length, periodic=True, dtype=torch.float64)


class LogMel(torch.nn.Module):
    """Waveforms ``[..., S]`` (float, in [-1, 1]) -> normalised log-mel ``[..., C, F, T]``."""

    def __init__(self, cfg: FrontendConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.fft_size, win_length=cfg.win_length,
            hop_length=cfg.hop_length, f_min=cfg.f_min, f_max=cfg.f_max or None, window_fn=WINDOWS[cfg.window],
            n_mels=cfg.n_mels, power=2.0, mel_scale=cfg.mel_scale, center=True)

    @torch.no_grad()
    def db(self, waves: torch.Tensor) -> torch.Tensor:
        """Waveforms ``[N, S]`` -> log-mel in dB ``[N, F, T]``, before normalisation (what a
        logmel corpus stores)."""
        power = self.mel(waves.float())
        return 10.0 * torch.log10(power.clamp_min(self.cfg.log_floor))

    @torch.no_grad()
    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        shape = waves.shape
        feats = self.cfg.normalise(self.db(waves.reshape(-1, shape[-1])))
        feats = feats.reshape(*shape[:-1], 1, *feats.shape[-2:])
        if self.cfg.channels > 1:
            feats = feats.expand(*feats.shape[:-3], self.cfg.channels, *feats.shape[-2:])
        return feats


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's intra-op threads set to one for the block, and given back after: for a
    process whose parallelism is elsewhere (a pool of workers, DALI's threads), where
    more threads for the small log-mel ops only contend (6.4x slower on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
