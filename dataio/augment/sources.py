"""Seeded material the ops read from: coloured-noise tables and room impulse responses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from dataio.errors import ConfigError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3")


class NoiseTables:
    """One unit-power noise signal per colour, long enough that views read at random
    offsets rarely overlap; built on the CPU from the seed, copied to a device once.
    Colours are shaped in the frequency domain, so each table is seamless when read
    circularly."""

    COLORS = ("white", "pink", "brown", "normal")
    _EXPONENT = {"white": 0.0, "pink": 0.5, "brown": 1.0}  # amplitude ~ f^-exponent

    def __init__(self, seed: int, max_samples: int, colors: list[str]):
        length = 1 << max(18, math.ceil(math.log2(max(4 * max_samples, 2))))
        gen = torch.Generator().manual_seed(int(seed) * 7 + 3)
        tables = []
        for color in colors:
            white = torch.randn(length, generator=gen, dtype=torch.float64)
            if color in ("white", "normal"):
                table = white
            else:
                spectrum = torch.fft.rfft(white)
                f = torch.arange(spectrum.shape[0], dtype=torch.float64)
                spectrum = spectrum * torch.where(f > 0, f.clamp_min(1) ** -self._EXPONENT[color], 0.0)
                table = torch.fft.irfft(spectrum, n=length)
            if color != "normal":
                table = table - table.mean()
            tables.append((table / table.pow(2).mean().sqrt()).float())
        self.table = torch.stack(tables)  # [colours, L]
        self._on: dict = {}

    def read(self, pick: torch.Tensor, offset: torch.Tensor, sign: torch.Tensor, size: int,
             device: torch.device) -> torch.Tensor:
        """[N, size] noise: colour ``pick``, start ``offset`` and sign ``sign`` are uniforms [N]."""
        if device not in self._on:
            self._on[device] = self.table.to(device)
        table = self._on[device]
        colors, length = table.shape
        row = (pick * colors).to(torch.int64).clamp_max(colors - 1)
        start = (offset * length).to(torch.int64)
        pos = (start[:, None] + torch.arange(size, device=device)[None, :]) % length
        noise = table.reshape(-1)[row[:, None] * length + pos]
        return noise * torch.where(sign < 0.5, -1.0, 1.0)[:, None]


def _one_pole_lowpass(x: np.ndarray, a: float) -> np.ndarray:
    """y[n] = (1 - a) x[n] + a y[n-1] (torchaudio's IIR filter, no Python loop per sample)."""
    y = torchaudio.functional.lfilter(torch.from_numpy(x)[None], torch.tensor([1.0, -a], dtype=torch.float64),
                                      torch.tensor([1.0 - a, 0.0], dtype=torch.float64), clamp=False)
    return y[0].numpy()


def synthetic_impulse_responses(seed: int, count: int, rate: int, rt60: list[float], drr_db: list[float],
                                max_seconds: float) -> torch.Tensor:
    """``count`` seeded synthetic rooms, [count, L] float32: a unit direct path, a 1-5 ms
    pre-delay, then Gaussian noise decaying by 60 dB over RT60, low-passed (wall
    absorption) and scaled to the drawn direct-to-reverberant ratio."""
    rng = np.random.default_rng([int(seed), 4242])
    length = max(2, int(min(max_seconds, rt60[1] * 1.2) * rate))
    bank = np.zeros((count, length), dtype=np.float64)
    for i in range(count):
        t60 = rng.uniform(*rt60)
        drr = rng.uniform(*drr_db)
        delay = int(rng.uniform(0.001, 0.005) * rate)
        n = np.arange(length - delay - 1)
        tail = rng.standard_normal(len(n)) * np.exp(-math.log(1000.0) * n / (t60 * rate))
        tail = _one_pole_lowpass(tail, rng.uniform(0.0, 0.6))
        tail *= math.sqrt(10 ** (-drr / 10) / max(float(np.sum(tail ** 2)), 1e-12))
        bank[i, 0] = 1.0
        bank[i, delay + 1:] = tail
    return torch.from_numpy(bank).float()


def load_impulse_responses(folder: str | Path, rate: int, max_seconds: float) -> torch.Tensor:
    """The impulse responses in ``folder``, [count, L] float32: mono, resampled to
    ``rate``, starting at their peak (the direct path), cut at ``max_seconds``, unit peak.
    An empty folder or an unreadable file is a ConfigError naming it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"augment rir.folder: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ConfigError(f"augment rir.folder: {root} holds no audio file ({', '.join(AUDIO_SUFFIXES)})")
    responses = []
    for path in files:
        try:
            wave, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception as err:
            raise ConfigError(f"augment rir.folder: cannot read impulse response {path}: {err}") from None
        wave = torch.from_numpy(wave.mean(axis=1))
        if wave.numel() == 0 or not torch.isfinite(wave).all() or wave.abs().max() == 0:
            raise ConfigError(f"augment rir.folder: impulse response {path} is empty, silent or not finite")
        if sr != rate:
            wave = torchaudio.functional.resample(wave, sr, rate)
        wave = wave[int(wave.abs().argmax()):][: max(1, int(max_seconds * rate))]
        responses.append(wave / wave.abs().max())
    length = max(len(r) for r in responses)
    return torch.stack([torch.nn.functional.pad(r, (0, length - len(r))) for r in responses])
