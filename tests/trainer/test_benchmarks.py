"""The benchmarks run (their numbers are quoted from real runs, not asserted here)."""

import argparse
import importlib.util
import subprocess

import pytest

from tests.conftest import PYTHON, REPO, cli_env


def test_bench_data_reports_each_backend_against_the_limit(tiny_shards, capsys):
    from trainer.bench.data import print_table, run

    backends = "torch,dali" if importlib.util.find_spec("nvidia.dali") else "torch"
    args = argparse.Namespace(shards=str(tiny_shards), clips=0, clip_seconds=0, cores=1, backends=backends,
                              batch_size=4, pairs=1, seconds=0.5, out=None, config=str(REPO / "configs/demo.yaml"))
    result = run(args)
    names = backends.split(",")
    assert set(result["clips_per_second"]) == {"decode_limit", *names, *(f"{n}+augment" for n in names)}
    assert all(v > 0 for v in result["clips_per_second"].values())
    print_table(result)
    assert "decode_limit" in capsys.readouterr().out


def test_bench_data_on_a_large_corpus_reads_a_bounded_sample_and_copies_no_corpus(tiny_shards, capsys, monkeypatch):
    """Issue 35, item 3: the limit decoded every clip and --formats converted the whole
    corpus (O(corpus): ~900 GB of copies for AudioSet). Now both, and the back ends, read
    the first whole shards holding --clips clips, and the output says so."""
    import trainer.bench.data as bench

    read, converted = [], []
    limit, convert = bench.decode_limit, bench.convert_manifest
    monkeypatch.setattr(bench, "decode_limit", lambda m, cores, *a: read.append(m.num_clips) or limit(m, cores, *a))
    monkeypatch.setattr(bench, "convert_manifest", lambda m, *a, **k: converted.append(len(m.shards)) or
                        convert(m, *a, **k))
    args = argparse.Namespace(shards=str(tiny_shards), clips=12, clip_seconds=0, cores=1, backends="torch",
                              batch_size=4, pairs=1, seconds=0.3, out=None, config=None, formats="flac,pcm16",
                              view_seconds=0.5)
    result = bench.run(args)
    assert result["clips"] == 24 and result["sample"] == {"clips": 12, "shards": 2, "of_shards": 4}
    assert read == [12] and converted == [2]
    assert set(result["formats"]["rows"]) == {"flac", "pcm16"}
    bench.print_table(result)
    out = capsys.readouterr().out
    assert "the first 2 of 4 shards, 12 of 24 clips" in out and "'+augment' rows" not in out  # no recipe: no such rows
    assert bench.main(["--shards", str(tiny_shards), "--formats", "flac,mp3"]) == 2  # refused before any work
    assert "mp3 is not a clip format" in capsys.readouterr().err


def test_the_decode_limit_decodes_what_a_loader_decodes_the_views_not_whole_clips(tiny_shards, monkeypatch):
    """Issue 36, row 8: the limit decoded every clip whole, so a loader cutting 1-s views of
    longer FLAC clips read faster than its "limit" (590 against 377 clips/s per core)."""
    import dataio.formats.flac as formats
    import trainer.bench.data as bench
    from dataio.formats.codec import ClipCodec
    from dataio.reading.manifest import load_manifest

    manifest = load_manifest(tiny_shards)
    read, views = bench.views_read(manifest, pairs=2)
    assert (read, views) == (manifest.sample_rate, 4)  # 1-s views, 2 views per pair
    cuts = []
    monkeypatch.setattr(formats.FlacClip, "whole", lambda self: pytest.fail("a whole clip decoded"))
    real_cut = formats.FlacClip.cut
    monkeypatch.setattr(formats.FlacClip, "cut", lambda self, starts, size, out=None:
                        cuts.append((len(starts), size)) or real_cut(self, starts, size, out))
    clips, _ = bench._decode_shards([str(p) for p in manifest.shard_paths()], ClipCodec.of(manifest), read,
                                    views)
    assert clips == manifest.num_clips and cuts == [(4, manifest.sample_rate)] * clips


@pytest.mark.e2e
def test_bench_gradcache_runs(tmp_path):
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "gradcache", "--batches", "8", "--cached", "16",
                          "--chunk", "8", "--width", "4", "--seconds", "0.2"],
                         env=cli_env(), capture_output=True, text=True, check=True)
    rows = out.stdout.strip().splitlines()
    assert len(rows) == 3 and rows[-1].split()[:2] == ["16", "8"]


def _tone_csv(folder):
    """A path,label,fold CSV of 27 decaying tones: 3 pitches x 3 folds x 3 clips."""
    import csv

    import numpy as np
    import soundfile as sf

    rows, rate = [], 16000
    (folder / "audio").mkdir()
    rng = np.random.default_rng(0)
    for label, f0 in (("low", 220.0), ("mid", 660.0), ("high", 1980.0)):
        for fold in (1, 2, 3):
            for k in range(3):
                t = np.arange(int(rate * rng.uniform(0.3, 1.2))) / rate
                wave = 0.3 * np.sin(2 * np.pi * f0 * (1 + 0.05 * k) * t) * np.exp(-3 * t)
                sf.write(folder / "audio" / f"{label}_{fold}_{k}.wav", wave.astype(np.float32), rate)
                rows.append((f"audio/{label}_{fold}_{k}.wav", label, fold))
    with open(folder / "meta.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "fold"), *rows])
    return folder / "meta.csv"


TINY = ["data.batch_size=8", "model.width=4", "train.progress=false", "train.tensorboard=false"]


@pytest.mark.e2e
def test_bench_quality_scores_pretrained_random_and_handcrafted(tmp_path):
    """On a tiny path,label,fold CSV of tones: the whole benchmark, end to end."""
    import json

    meta = _tone_csv(tmp_path)
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "quality", "--csv", str(meta),
                          "--config", str(REPO / "configs/demo.yaml"), "--minutes", "0.05", "--seeds", "0,1",
                          "--out", str(tmp_path / "q"), "--patch-seconds", "0.5", "--online-every", "1", *TINY],
                         env=cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "q" / "quality.json").read_text())
    per_epoch = result["timing"]["calibrated_seconds_per_epoch"]  # from a timed run of padded short clips
    assert result["epochs"] == max(1, int(0.05 * 60 // per_epoch)) and per_epoch > 0
    assert result["seeds"] == [0, 1] and result["clips"] == 27 and result["recipe"]["model"]["width"] == 4
    for key in ("linear", "knn", "linear_random_init", "knn_random_init"):
        assert len(result["summary"][key]["seeds"]) == 2 and 0 <= result["summary"][key]["mean"] <= 1
    assert len(result["handcrafted"]["folds"]) == 3
    assert result["handcrafted"]["class_averaged_accuracy"] > 0.6, "three tones apart are easy for features"
    assert "random init" in out.stdout and "hand-crafted" in out.stdout
    assert "trained on cpu, " in out.stdout and " thread(s), 1 rank(s), " in out.stdout  # issue 34
    assert set(result["trained_on"]) == {"0", "1"}
    for seed in ("0", "1"):  # the online probe's curve: one kNN score per epoch, the last = the final kNN
        curve = result["online_curves"][seed]
        assert [e for e, _ in curve] == list(range(1, result["epochs"] + 1))
        assert curve[-1][1] == result["per_seed"][seed]["knn"]["mean"]
    assert "online kNN, seed 0: ep 1 " in out.stdout


@pytest.mark.e2e
def test_bench_quality_pretrains_a_label_reading_objective_without_the_fold_it_scores(tmp_path):
    """SupCon reads labels: one encoder per held-out fold, trained on the other folds'
    clips only, scored on its fold alone; --shards (no CSV to split) is refused."""
    import json

    from dataio.reading.manifest import load_manifest
    from trainer.evaluate.clips import load_clipset

    meta = _tone_csv(tmp_path)
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "quality", "--csv", str(meta),
                          "--config", str(REPO / "configs/demo_supcon.yaml"), "--epochs", "1", "--seeds", "0",
                          "--out", str(tmp_path / "q"), "--patch-seconds", "0.5", *TINY],
                         env=cli_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert result["pretrained_per_fold"] and "one encoder per held-out fold" in out.stdout
    for fold in (1, 2, 3):
        manifest = load_manifest(tmp_path / "q" / f"shards-without-fold{fold}")
        trained_on = load_clipset(manifest)
        assert len(trained_on.keys) == 18 and fold not in set(trained_on.folds.tolist())
        assert manifest.vocabulary == ["high", "low", "mid"]
        scored = json.loads(next((tmp_path / "q" / "seed0" / f"without-fold{fold}" / "eval").glob("*/linear.json"))
                            .read_text())
        assert list(scored["rounds"]) == [f"fold{fold}"]
    seed = result["per_seed"]["0"]
    assert len(seed["linear"]["folds"]) == len(seed["knn"]["folds"]) == len(seed["linear_random_init"]["folds"]) == 3
    refused = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "quality",
                              "--shards", str(tmp_path / "q" / "shards"),
                              "--config", str(REPO / "configs/demo_supcon.yaml"), "--epochs", "1",
                              "--out", str(tmp_path / "q2"), *TINY],
                             env=cli_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "learns from labels" in refused.stderr and "--csv" in refused.stderr
