"""tools/short_sounds.py on a tiny CSV whose shares are known."""

import csv

import numpy as np
import pytest
import soundfile as sf

from tools.short_sounds import main, measure, tonality, tonality_by_label


def test_measure_counts_padding_quiet_frames_and_mostly_quiet_patches():
    rate = 1000
    short = np.ones(500, np.float32)  # 0.5 s, all loud: half a view of padding
    ring = np.concatenate([np.ones(1000), np.full(1000, 1e-3)]).astype(np.float32)  # 1 s loud, 1 s at -60 dB
    got = measure([short, ring], rate, view_seconds=1.0, quiet_db=40.0)
    assert got["shorter_than_a_view"] == 0.5
    assert got["padding_share_of_view_samples"] == pytest.approx(500 / 2000)
    assert got["quiet_share_of_frames"] == pytest.approx((0 + 0.5) / 2)
    # patches: the short clip's one (half padding), the ring's [0, 1) s, [0.5, 1.5) s, [1, 2) s (quiet)
    assert got["mostly_quiet_or_padding_patches"] == pytest.approx(1 / 4)


def test_the_command_reads_a_path_label_fold_csv(tmp_path, capsys):
    rows = []
    for i, seconds in enumerate((0.25, 2.0)):
        sf.write(tmp_path / f"c{i}.wav", np.full(int(16000 * seconds), 0.1, np.float32), 16000)
        rows.append((f"c{i}.wav", "a", 1))
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "fold"), *rows])
    assert main([str(tmp_path / "meta.csv")]) == 0
    out = capsys.readouterr().out
    assert "shorter_than_a_view               0.500" in out and "clips                             2" in out


def test_tonality_tells_a_periodic_note_from_noise_but_calls_a_low_decaying_sine_a_note():
    rate = 16000
    t = np.arange(rate) / rate
    note = sum(np.sin(2 * np.pi * 220 * k * t) / k for k in range(1, 8)).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal(rate).astype(np.float32)
    kick = (np.sin(2 * np.pi * 55 * t) * np.exp(-t / 0.2)).astype(np.float32)  # a low sine, decaying
    (note_flat, note_harm), (noise_flat, noise_harm) = tonality(note, rate), tonality(noise, rate)
    kick_flat, kick_harm = tonality(kick, rate)
    assert note_flat < 0.01 and note_harm > 0.9
    assert noise_flat > 0.4 and noise_harm < 0.3
    assert kick_flat < 0.01 and kick_harm > 0.5  # a kick drum's sine looks like a note to both
    assert tonality(np.zeros(100, np.float32), rate) == (1.0, 0.0)


def test_per_label_prints_each_labels_tonality(tmp_path, capsys):
    rate, rows = 16000, []
    t = np.arange(rate) / rate
    clips = {"note": (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32),
             "noise": (0.1 * np.random.default_rng(1).standard_normal(rate)).astype(np.float32)}
    for name, wave in clips.items():
        sf.write(tmp_path / f"{name}.wav", wave, rate)
        rows.append((f"{name}.wav", name, 1))
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "fold"), *rows])
    got = tonality_by_label(list(clips.values()), list(clips), rate)
    assert got["note"]["harmonicity"][1] > 0.9 > 0.3 > got["noise"]["harmonicity"][1]
    assert main([str(tmp_path / "meta.csv"), "--per-label"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("label") and lines[-2].startswith("noise") and lines[-1].startswith("note")
