"""tools/short_sounds.py on a tiny CSV whose shares are known."""

import csv

import numpy as np
import pytest
import soundfile as sf

from tools.short_sounds import main, measure


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
