"""The embedded default corpus: synthetic sound events with real variety inside each class.

Ten classes that differ in structure (harmonicity, inharmonic partials, sweeps, impulse
trains, modulation), not in one parameter: inside a class the pitch, duration, onset,
envelope, repetition, decay and the background noise (colour and SNR) are all drawn at
random, so an encoder must learn what a class *is* to group its clips. Labels are
written to the shards for evaluation only; pretraining never reads them.
"""

from __future__ import annotations

import numpy as np

from dataio.writing.sources.item import ClipItem

RATE = 16000


def _t(n: int) -> np.ndarray:
    return np.arange(n) / RATE


def _env(n: int, attack: float, decay: float) -> np.ndarray:
    """Linear attack (s) then exponential decay (time constant, s)."""
    t = _t(n)
    a = np.clip(t / max(attack, 1e-3), 0, 1)
    return a * np.exp(-np.maximum(t - attack, 0) / decay)


def bell(n, r):
    f0, tau = r.uniform(300, 1500), r.uniform(0.3, 1.5)
    ratios = np.array([1.0, 2.76, 5.40, 8.93]) * r.uniform(0.97, 1.03, 4)
    amps = np.array([1.0, 0.6, 0.35, 0.2]) * r.uniform(0.6, 1.4, 4)
    t = _t(n)
    tone = sum(a * np.sin(2 * np.pi * f0 * k * t + r.uniform(0, 6.3)) * np.exp(-t * k / (tau * 2))
               for a, k in zip(amps, ratios) if f0 * k < RATE / 2)
    return tone * _env(n, 0.002, tau)


def whistle(n, r):
    f0, rate, depth = r.uniform(800, 3000), r.uniform(3, 7), r.uniform(0.005, 0.03)
    t = _t(n)
    phase = 2 * np.pi * np.cumsum(f0 * (1 + depth * np.sin(2 * np.pi * rate * t))) / RATE
    return np.sin(phase) * _env(n, r.uniform(0.02, 0.2), r.uniform(0.5, 3.0))


def chirp(n, r):
    out = np.zeros(n)
    for _ in range(r.integers(1, 4)):
        m = int(r.uniform(0.2, 0.8) * RATE)
        start = int(r.integers(0, max(1, n - m)))
        m = min(m, n - start)
        f = np.geomspace(r.uniform(150, 500), r.uniform(2000, 6000), m)
        out[start:start + m] += np.sin(2 * np.pi * np.cumsum(f) / RATE) * np.hanning(m)
    return out


def knock(n, r):
    out = np.zeros(n)
    pos, gap = int(r.uniform(0, 0.3) * RATE), r.uniform(0.08, 0.4)
    for _ in range(r.integers(2, 7)):
        if pos >= n:
            break
        m = min(int(0.06 * RATE), n - pos)
        burst = np.convolve(r.standard_normal(m), np.ones(r.integers(4, 16)) / 8, "same")
        out[pos:pos + m] += burst * _env(m, 0.001, r.uniform(0.005, 0.02))
        pos += int(gap * RATE * r.uniform(0.8, 1.2))
    return out


def engine(n, r):
    f0, t = r.uniform(40, 120), _t(n)
    wobble = 1 + 0.02 * np.sin(2 * np.pi * r.uniform(0.2, 2) * t)
    phase = 2 * np.pi * np.cumsum(f0 * wobble) / RATE
    tone = sum(np.sin(k * phase) / k ** r.uniform(0.6, 1.2) for k in range(1, int(3000 / f0)))
    return tone * (1 + 0.4 * np.sin(2 * np.pi * r.uniform(5, 25) * t))


def vowel(n, r):
    f0, t = r.uniform(100, 250), _t(n)
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))) / RATE
    formants = r.choice([[700, 1200], [300, 2300], [500, 900], [400, 2000]])
    tone = sum(np.sin(k * phase) * sum(np.exp(-((k * f0 - f) / 120) ** 2) for f in formants)
               for k in range(1, int(4000 / f0)))
    syllables = np.clip(np.sin(2 * np.pi * r.uniform(3, 6) * t + r.uniform(0, 6.3)), 0, None) ** 0.5
    return tone * syllables


def rain(n, r):
    noise = np.diff(r.standard_normal(n + 1)) * 0.3
    drops = (r.random(n) < r.uniform(0.002, 0.01)) * r.standard_normal(n) * 3
    drops = np.convolve(drops, np.exp(-np.arange(40) / 6), "same")
    return noise + drops


def siren(n, r):
    t = _t(n)
    lo, hi, period = r.uniform(500, 900), r.uniform(1100, 1800), r.uniform(0.5, 2.0)
    f = lo + (hi - lo) * 0.5 * (1 + np.sin(2 * np.pi * t / period + r.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(f) / RATE
    return np.sin(phase) + 0.3 * np.sin(2 * phase)


def drum(n, r):
    out = np.zeros(n)
    beat, f0 = r.uniform(0.25, 0.7), r.uniform(50, 150)
    pos = int(r.uniform(0, 0.2) * RATE)
    m = int(0.4 * RATE)
    tk = _t(m)
    hit = np.sin(2 * np.pi * np.cumsum(f0 * (1 + 2 * np.exp(-tk / 0.02))) / RATE) * np.exp(-tk / r.uniform(0.05, 0.2))
    while pos < n:
        k = min(m, n - pos)
        out[pos:pos + k] += hit[:k]
        pos += int(beat * RATE)
    return out


def organ(n, r):
    root, t = r.uniform(130, 520), _t(n)
    notes = root * np.array([1.0, r.choice([1.25, 1.19]), 1.5])
    tone = sum(np.sin(2 * np.pi * f * k * t) / k for f in notes for k in (1, 2, 3, 4) if f * k < RATE / 2)
    return tone * _env(n, r.uniform(0.05, 0.3), r.uniform(2.0, 8.0))


CLASSES = {"bell": bell, "whistle": whistle, "chirp": chirp, "knock": knock, "engine": engine,
           "vowel": vowel, "rain": rain, "siren": siren, "drum": drum, "organ": organ}


def _background(n: int, r: np.random.Generator) -> np.ndarray:
    """White, pink-ish or brown-ish noise, unit RMS."""
    white = r.standard_normal(n)
    colour = r.integers(3)
    if colour == 1:
        white = np.convolve(white, np.exp(-np.arange(64) / 8), "same")
    elif colour == 2:
        white = np.cumsum(white)
        white -= np.convolve(white, np.ones(801) / 801, "same")
    return white / (np.sqrt(np.mean(white ** 2)) + 1e-12)


def synthesize(label: str, seed: int, duration: float) -> np.ndarray:
    """One clip of class ``label``: the event (random onset and length) in background
    noise at a random SNR (0-30 dB), peak-normalised to a random level. float32 [S]."""
    r = np.random.default_rng(seed)
    n = int(duration * RATE)
    event_len = int(n * r.uniform(0.4, 1.0))
    event = CLASSES[label](event_len, r)
    event = event / (np.sqrt(np.mean(event ** 2)) + 1e-12)
    onset = int(r.integers(0, n - event_len + 1))
    clip = np.zeros(n)
    clip[onset:onset + event_len] = event
    snr_db = r.uniform(0, 30)
    clip += _background(n, r) * 10 ** (-snr_db / 20)
    peak = np.max(np.abs(clip)) + 1e-12
    return (clip / peak * 10 ** (r.uniform(-20, -1) / 20)).astype(np.float32)


def synth_loader(item: ClipItem) -> tuple[np.ndarray, int]:
    """Shard-writer loader: the clip described by ``item.extra`` (class, seed, duration)."""
    e = item.extra
    return synthesize(e["class"], e["seed"], e["duration"])[:, None], RATE


def demo_items(clips: int = 400, seed: int = 0, min_seconds: float = 1.0, max_seconds: float = 5.0,
               folds: int = 5, classes: list[str] | None = None) -> list[ClipItem]:
    """``clips`` items spread evenly over the classes, each with its fold (1..folds)."""
    names = classes or list(CLASSES)
    r = np.random.default_rng(seed)
    items = []
    for i in range(clips):
        label = names[i % len(names)]
        j = i // len(names)
        items.append(ClipItem(path=f"{label}/{j:04d}", labels=[label], split="train",
                              fold=j % folds + 1, key=f"{label}_{j:04d}",
                              extra={"class": label, "seed": int(r.integers(2 ** 31)),
                                     "duration": float(r.uniform(min_seconds, max_seconds))}))
    return items
