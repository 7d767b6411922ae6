#!/usr/bin/env python3
"""How much of what an encoder sees of a labelled set is padding or near-silence.

    python3 tools/short_sounds.py ../shared/data/percussion/meta.csv [--view-seconds 1.0] [--per-label]

For a ``path,label,fold`` CSV (or any layout ``audioclr shard`` reads as csv) it prints the
clip durations (10th / 50th / 90th percentile), the share of clips shorter than a view, the
share of view samples that are zero padding (a short clip padded to one view), the share of a
clip's frames more than ``--quiet-db`` below its loudest frame, and the share of evaluation
patches (one view long, half-view hop, as ``audioclr eval``) that are mostly (> 80 %) quiet
or padding. docs/learning-quality.md compares the instruments and percussion sets with it.

With ``--per-label`` it also prints, per label, how pitched the clips are (median and 10th /
90th percentile over the label's clips): the spectral flatness of the clip's frames (0 = a
few strong partials, about 0.56 = white noise) and their harmonicity (the highest normalised
autocorrelation at a period of 2-25 ms, 40-500 Hz; near 1 for a periodic note), each frame
weighted by its energy, frames more than 30 dB under the loudest left out. A chain that
sizes its frequency changes per clip would need such a measure to tell a note from a hit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: the repository's packages beside this folder
    sys.path.insert(0, str(REPO))

from dataio.backends.views import patch_starts  # noqa: E402
from dataio.writing.shard_writer import soundfile_loader  # noqa: E402
from dataio.writing.sources import load_layout  # noqa: E402


def mono_wave(item, rate: int) -> np.ndarray:
    """The clip of ``item``, mono float32 at ``rate`` Hz."""
    samples, native = soundfile_loader(item)
    mono = samples.mean(axis=1)
    if native != rate:
        import torch  # deferred: only a clip at another rate needs it
        import torchaudio

        mono = torchaudio.functional.resample(torch.from_numpy(mono), native, rate).numpy()
    return mono


def frame_db(wave: np.ndarray, frame: int) -> np.ndarray:
    """Power of each ``frame``-sample frame, dB (the last frame may be short)."""
    starts = np.arange(0, max(len(wave), 1), frame)
    power = np.array([np.mean(wave[s:s + frame] ** 2) if s < len(wave) else 0.0 for s in starts])
    return 10 * np.log10(power + 1e-12)


def measure(waves: list[np.ndarray], rate: int, view_seconds: float, quiet_db: float) -> dict:
    view, frame = int(view_seconds * rate), int(0.01 * rate)
    durations, padding, quiet_frames, busy_patches, patches = [], 0, [], 0, 0
    for wave in waves:
        durations.append(len(wave) / rate)
        padding += max(0, view - len(wave))
        db = frame_db(wave, frame)
        quiet = db < db.max() - quiet_db
        quiet_frames.append(quiet.mean())
        padded = np.concatenate([quiet, np.ones(max(0, view - len(wave)) // frame, bool)])
        for start in patch_starts(max(len(wave), view), view, view // 2):
            patches += 1
            busy_patches += padded[start // frame:(start + view) // frame].mean() > 0.8
    d = np.array(durations)
    return {"clips": len(d), "seconds_p10_p50_p90": np.percentile(d, [10, 50, 90]).round(2).tolist(),
            "shorter_than_a_view": float((d < view_seconds).mean()),
            "padding_share_of_view_samples": padding / (len(d) * view),
            "quiet_share_of_frames": float(np.mean(quiet_frames)),
            "mostly_quiet_or_padding_patches": busy_patches / patches}


def tonality(wave: np.ndarray, rate: int, frame: int = 1024) -> tuple[float, float]:
    """(spectral flatness, harmonicity) of a clip, energy-weighted over its frames within 30 dB
    of the loudest (Hann windows of ``frame`` samples, half-frame hop)."""
    padded = np.pad(wave, (0, max(0, frame - len(wave))))
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::frame // 2] * np.hanning(frame)
    energy = (frames ** 2).sum(axis=1)
    if energy.max() <= 0:
        return 1.0, 0.0  # silence: nothing pitched
    keep = energy > energy.max() * 1e-3
    power = np.abs(np.fft.rfft(frames[keep], axis=1)) ** 2 + 1e-12
    flatness = np.exp(np.log(power).mean(axis=1)) / power.mean(axis=1)
    autocorr = np.fft.irfft(power, axis=1)
    autocorr = autocorr / autocorr[:, :1]
    lags = slice(int(0.002 * rate), min(int(0.025 * rate), frame // 2))
    harmonicity = autocorr[:, lags].max(axis=1)
    weight = energy[keep] / energy[keep].sum()
    return float((flatness * weight).sum()), float((harmonicity * weight).sum())


def tonality_by_label(waves: list[np.ndarray], labels: list[str], rate: int) -> dict:
    """``{label: {"flatness": [p10, p50, p90], "harmonicity": [p10, p50, p90]}}``."""
    per: dict[str, list[tuple[float, float]]] = {}
    for wave, label in zip(waves, labels):
        per.setdefault(label, []).append(tonality(wave, rate))
    out = {}
    for label, values in sorted(per.items()):
        v = np.array(values)
        out[label] = {name: np.percentile(v[:, i], [10, 50, 90]).round(3).tolist()
                      for i, name in enumerate(("flatness", "harmonicity"))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="path,label,fold CSV (paths relative to it)")
    p.add_argument("--view-seconds", type=float, default=1.0, help="view / evaluation patch length, s")
    p.add_argument("--quiet-db", type=float, default=40.0, help="a frame this far below the clip's loudest is quiet")
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--per-label", action="store_true",
                   help="also print each label's spectral flatness and harmonicity (p10 / median / p90)")
    args = p.parse_args(argv)
    listing = load_layout("csv", Path(args.csv))
    waves = [mono_wave(item, args.sample_rate) for item in listing.items]
    for key, value in measure(waves, args.sample_rate, args.view_seconds, args.quiet_db).items():
        print(f"{key:<34}{value if isinstance(value, (int, list)) else f'{value:.3f}'}")
    if args.per_label:
        labels = [",".join(item.labels) for item in listing.items]
        print(f"{'label':<20}{'flatness p10/p50/p90':<26}harmonicity p10/p50/p90")
        for label, got in tonality_by_label(waves, labels, args.sample_rate).items():
            print(f"{label:<20}{' / '.join(f'{x:.3f}' for x in got['flatness']):<26}"
                  f"{' / '.join(f'{x:.2f}' for x in got['harmonicity'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
