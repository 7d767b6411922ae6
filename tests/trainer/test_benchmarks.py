"""The benchmarks run (their numbers are quoted from real runs, not asserted here)."""

import argparse
import importlib.util
import subprocess

import pytest

from tests.conftest import PYTHON, REPO, cli_env


def test_bench_data_reports_each_backend_against_the_limit(tiny_shards, capsys):
    from trainer.bench_data import print_table, run

    backends = "torch,dali" if importlib.util.find_spec("nvidia.dali") else "torch"
    args = argparse.Namespace(shards=str(tiny_shards), clips=0, clip_seconds=0, cores=1, backends=backends,
                              batch_size=4, pairs=1, seconds=0.5, out=None, config=str(REPO / "configs/demo.yaml"))
    result = run(args)
    names = backends.split(",")
    assert set(result["clips_per_second"]) == {"decode_limit", *names, *(f"{n}+augment" for n in names)}
    assert all(v > 0 for v in result["clips_per_second"].values())
    print_table(result)
    assert "decode_limit" in capsys.readouterr().out


@pytest.mark.e2e
def test_bench_gradcache_runs(tmp_path):
    out = subprocess.run([PYTHON, str(REPO / "tools" / "bench_gradcache.py"), "--batches", "8", "--cached", "16",
                          "--chunk", "8", "--width", "4", "--seconds", "0.2"],
                         env=cli_env(), capture_output=True, text=True, check=True)
    rows = out.stdout.strip().splitlines()
    assert len(rows) == 3 and rows[-1].split()[:2] == ["16", "8"]


@pytest.mark.e2e
def test_bench_quality_scores_pretrained_random_and_handcrafted(tmp_path):
    """On a tiny path,label,fold CSV of tones: the whole benchmark, end to end."""
    import csv
    import json

    import numpy as np
    import soundfile as sf

    rows, rate = [], 16000
    (tmp_path / "audio").mkdir()
    rng = np.random.default_rng(0)
    for label, f0 in (("low", 220.0), ("mid", 660.0), ("high", 1980.0)):
        for fold in (1, 2, 3):
            for k in range(3):
                t = np.arange(int(rate * rng.uniform(0.3, 1.2))) / rate
                wave = 0.3 * np.sin(2 * np.pi * f0 * (1 + 0.05 * k) * t) * np.exp(-3 * t)
                sf.write(tmp_path / "audio" / f"{label}_{fold}_{k}.wav", wave.astype(np.float32), rate)
                rows.append((f"audio/{label}_{fold}_{k}.wav", label, fold))
    with open(tmp_path / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "fold"), *rows])
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "quality", "--csv", str(tmp_path / "meta.csv"),
                          "--config", str(REPO / "configs/demo.yaml"), "--minutes", "0.05", "--seeds", "0,1",
                          "--out", str(tmp_path / "q"), "--patch-seconds", "0.5", "--online-every", "1", "data.batch_size=8",
                          "model.width=4", "train.progress=false", "train.tensorboard=false"],
                         env=cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "q" / "quality.json").read_text())
    per_epoch = result["timing"]["calibrated_seconds_per_epoch"]  # from a timed run of padded short clips
    assert result["epochs"] == max(1, int(0.05 * 60 // per_epoch)) and per_epoch > 0
    assert result["seeds"] == [0, 1] and result["clips"] == 27
    for key in ("linear", "knn", "linear_random_init", "knn_random_init"):
        assert len(result["summary"][key]["seeds"]) == 2 and 0 <= result["summary"][key]["mean"] <= 1
    assert len(result["handcrafted"]["folds"]) == 3
    assert result["handcrafted"]["class_averaged_accuracy"] > 0.6, "three tones apart are easy for features"
    assert "random init" in out.stdout and "hand-crafted" in out.stdout
    for seed in ("0", "1"):  # the online probe's curve: one kNN score per epoch, the last = the final kNN
        curve = result["online_curves"][seed]
        assert [e for e, _ in curve] == list(range(1, result["epochs"] + 1))
        assert curve[-1][1] == result["per_seed"][seed]["knn"]["mean"]
    assert "online kNN, seed 0: ep 1 " in out.stdout
