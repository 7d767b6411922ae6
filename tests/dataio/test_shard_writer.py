"""The shard writer: round trip through tar/FLAC/JSON/DALI index, rejections, CSV and CLI."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dataio.errors import ShardWriteError
from dataio.reading.manifest import load_manifest
from dataio.writing.shard_cli import parse_size
from dataio.writing.shard_pipeline import write_shards
from dataio.writing.shard_writer import REJECTED_NAME
from dataio.writing.sources import items_for_layout
from dataio.writing.sources.folder import csv_items, folder_items
from dataio.writing.sources.item import ClipItem

RATE = 16000
LSB = 1.0 / 32768.0  # one step of 16-bit PCM


def _noise(seconds: float, rate: int, channels: int, seed: int,
           amplitude: float = 0.5) -> np.ndarray:
    """Band-limited-ish test audio, float32 [frames, channels]."""
    rng = np.random.default_rng(seed)
    frames = int(round(seconds * rate))
    t = np.arange(frames) / rate
    tones = [np.sin(2 * math.pi * rng.uniform(100, 0.3 * rate) * t) for _ in range(channels)]
    return (amplitude * np.stack(tones, axis=1) + 0.05 * rng.standard_normal((frames, channels))
            ).astype(np.float32).clip(-0.9, 0.9)


# relative path -> (rate in Hz, channels, seconds)
TREE = {
    "bird/a.wav": (16000, 1, 0.5),
    "bird/deep/b.wav": (8000, 2, 0.4),
    "dog/c.wav": (22050, 1, 0.3),
    "dog/d.flac": (16000, 2, 0.5),
    "dog/e.wav": (8000, 1, 0.25),
    "rain/f.wav": (22050, 2, 0.6),
    "rain/g.wav": (16000, 1, 0.35),
    "rain/h.wav": (16000, 1, 0.2),
}


@pytest.fixture(scope="module")
def audio_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for i, (relative, (rate, channels, seconds)) in enumerate(TREE.items()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, _noise(seconds, rate, channels, seed=i), rate, subtype="PCM_16")
    (root / "rain" / "notes.txt").write_text("not audio")
    (root / "loose.wav").write_bytes(b"files directly in SRC have no label")
    return root


def _expected(path: Path) -> np.ndarray:
    """What the shard should hold for ``path``: mono, 16 kHz, quantised to 16 bits."""
    import torch
    import torchaudio.functional as AF
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != RATE:
        mono = AF.resample(torch.from_numpy(mono), rate, RATE).numpy()
    return np.clip(np.rint(np.clip(mono, -1, 1) * 32768), -32768, 32767) / 32768.0


def _read_shards(folder: Path) -> list[tuple[str, dict, np.ndarray, int]]:
    """(key, json, samples, rate) of every clip, in shard order, read with tarfile."""
    clips = []
    for shard in load_manifest(folder).shard_paths():
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.mode == 0o444 and m.uid == m.gid == 0 for m in members)
            names = [m.name for m in members]
            for flac_name, json_name in zip(names[::2], names[1::2]):
                key = flac_name[: -len(".flac")]
                assert json_name == key + ".json"
                flac = io.BytesIO(tar.extractfile(flac_name).read())
                samples, rate = sf.read(flac, dtype="float32")
                clips.append((key, json.loads(tar.extractfile(json_name).read()), samples, rate))
    return clips


def _check_dali_index(tar_path: Path, idx_path: Path) -> None:
    """Every index entry points at its member's data in the tar (format of DALI's wds2idx v1.2)."""
    lines = idx_path.read_text().splitlines()
    version, count = lines[0].split()
    assert version == "v1.2" and int(count) == len(lines) - 1
    blob = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        keys = list(dict.fromkeys(n.split(".")[0] for n in names))
        assert len(keys) == int(count)
        for key, line in zip(keys, lines[1:]):
            fields = line.split()
            assert len(fields) == 8  # flac and json: <ext> <offset> <size> <name> each
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                offset, size = int(offset), int(size)
                assert name == f"{key}.{ext}" and offset % 512 == 0
                assert blob[offset:offset + size] == tar.extractfile(name).read()


def test_round_trip(audio_tree, tmp_path):
    items = folder_items(audio_tree)
    assert [i.key for i in items] == [r.replace("/", "_").replace(".", "_") for r in TREE]
    out = tmp_path / "shards"
    report = write_shards(items, out, dataset="toy", shard_size=3, workers=2, seed=0,
                          progress=False)
    assert (report.num_accepted, report.num_shards, report.rejected) == (8, 3, [])
    manifest = load_manifest(out)
    assert manifest.num_clips == 8 and [s.count for s in manifest.shards] == [3, 3, 2]
    assert manifest.vocabulary == ["bird", "dog", "rain"] and not manifest.multi_label
    assert manifest.sample_rate == RATE and manifest.dataset == "toy"

    clips = _read_shards(out)
    assert [meta["index"] for _, meta, _, _ in clips] == list(range(8))
    by_key = {item.key: (rel, item) for rel, item in zip(TREE, items)}
    for key, meta, samples, rate in clips:
        relative, item = by_key[key]
        assert set(meta) == {"index", "dataset", "labels", "split", "fold", "duration"}
        assert meta["labels"] == [relative.split("/")[0]] and meta["dataset"] == "toy"
        assert meta["split"] == "train" and meta["fold"] is None
        assert rate == RATE and samples.ndim == 1
        assert meta["duration"] == pytest.approx(len(samples) / RATE, abs=1e-6)
        assert meta["duration"] == pytest.approx(TREE[relative][2], abs=1.0 / TREE[relative][0])
        expected = _expected(Path(item.path))
        assert samples.shape == expected.shape
        if TREE[relative][:2] == (16000, 1):  # nothing to mix or resample: lossless
            np.testing.assert_array_equal(samples, sf.read(item.path, dtype="float32")[0])
        np.testing.assert_allclose(samples, expected, rtol=0, atol=LSB + 1e-7)

    for shard in manifest.shards:
        _check_dali_index(out / shard.url, out / shard.index_file)

    import webdataset as wds
    urls = [str(p) for p in manifest.shard_paths()]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [key for key, *_ in clips]
    assert [json.loads(s["json"])["index"] for s in samples] == list(range(8))

    # same seed, one process: byte-identical files; another seed: another order
    again = write_shards(items, tmp_path / "again", dataset="toy", shard_size=3, workers=1,
                         seed=0, progress=False)
    for name in sorted(p.name for p in out.iterdir()):
        assert (out / name).read_bytes() == (again.out_dir / name).read_bytes(), name
    write_shards(items, tmp_path / "other", dataset="toy", shard_size=3, workers=1, seed=1,
                 progress=False)
    other = _read_shards(tmp_path / "other")
    assert sorted(k for k, *_ in other) == sorted(k for k, *_ in clips)
    assert [k for k, *_ in other] != [k for k, *_ in clips]


def test_rejections_are_listed_with_reasons(tmp_path):
    src = tmp_path / "src" / "lab"
    src.mkdir(parents=True)
    for i in range(2):
        sf.write(src / f"good{i}.wav", _noise(0.3, RATE, 1, seed=i), RATE)
    loud = np.full((RATE // 4, 1), 1.5, np.float32)
    sf.write(src / "loud.wav", loud, RATE, subtype="FLOAT")  # clipped, not rejected
    (src / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    sf.write(src / "empty.wav", np.zeros((0, 1), np.float32), RATE)
    nan = _noise(0.3, RATE, 1, seed=5)
    nan[100] = np.nan
    sf.write(src / "nan.wav", nan, RATE, subtype="FLOAT")
    sf.write(src / "short.wav", _noise(0.01, RATE, 1, seed=6), RATE)  # under the 25 ms default
    items = folder_items(tmp_path / "src") + [ClipItem(str(tmp_path / "gone.wav"), ["lab"])]

    out = tmp_path / "out"
    report = write_shards(items, out, dataset="bad", workers=1, progress=False)
    assert report.num_accepted == 3 and load_manifest(out).num_clips == 3
    lines = (out / REJECTED_NAME).read_text().splitlines()
    assert lines[0] == "path\treason"
    reasons = dict(line.split("\t") for line in lines[1:])
    assert reasons == dict(report.rejected)
    assert sorted(Path(p).name for p in reasons) == ["corrupt.wav", "empty.wav", "gone.wav",
                                                     "nan.wav", "short.wav"]
    by_name = {Path(p).name: r for p, r in reasons.items()}
    assert by_name["corrupt.wav"].startswith("unreadable")
    assert by_name["empty.wav"].startswith("empty")
    assert by_name["nan.wav"].startswith("non-finite")
    assert by_name["short.wav"].startswith("too short")
    assert by_name["gone.wav"] == "missing file"
    clips = _read_shards(out)
    assert [meta["index"] for _, meta, _, _ in clips] == [0, 1, 2]
    loud_clip = next(s for k, _, s, _ in clips if k == "lab_loud_wav")
    assert loud_clip.max() == pytest.approx(32767 / 32768)

    with pytest.raises(ShardWriteError, match="none of the 1 clips"):
        write_shards([ClipItem(str(src / "corrupt.wav"), ["lab"])], tmp_path / "none",
                     dataset="bad", workers=1, progress=False)
    assert (tmp_path / "none" / REJECTED_NAME).is_file()


def _sine_loader(item: ClipItem) -> tuple[np.ndarray, int]:
    """A custom loader: a sine of ``extra["hz"]`` Hz, 0.25 s at 8 kHz, mono [frames]."""
    t = np.arange(2000) / 8000
    return (0.3 * np.sin(2 * math.pi * item.extra["hz"] * t)).astype(np.float32), 8000


def test_custom_loader_multi_label_and_shard_bytes(tmp_path):
    items = [ClipItem(f"synth:{hz}", ["tone", f"hz{hz}"] if hz > 500 else ["tone"],
                      extra={"hz": hz}) for hz in (220, 440, 880)]
    report = write_shards(items, tmp_path / "out", dataset="synth", shard_bytes=1, workers=1,
                          loader=_sine_loader, progress=False)
    manifest = load_manifest(tmp_path / "out")
    assert report.num_shards == 3 and [s.count for s in manifest.shards] == [1, 1, 1]
    assert manifest.multi_label and manifest.vocabulary == ["hz880", "tone"]
    assert all(meta["duration"] == 0.25 for _, meta, _, _ in _read_shards(tmp_path / "out"))
    with pytest.raises(ShardWriteError, match="top-level function"):
        write_shards(items, tmp_path / "lam", dataset="x", workers=2, progress=False,
                     loader=lambda item: _sine_loader(item))
    with pytest.raises(ShardWriteError, match="vocabulary"):
        write_shards(items, tmp_path / "voc", dataset="x", workers=1, vocabulary=["tone"])


def test_refuses_non_empty_folder_unless_overwrite(audio_tree, tmp_path):
    items = folder_items(audio_tree)[:3]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    with pytest.raises(ShardWriteError, match="--overwrite") as caught:
        write_shards(items, out, dataset="t", workers=1, progress=False)
    assert str(out) in str(caught.value)
    write_shards(items, out, dataset="t", shard_size=1, workers=1, overwrite=True, progress=False)
    assert len(load_manifest(out).shards) == 3
    with pytest.raises(ShardWriteError):
        write_shards(items, out, dataset="t", workers=1, progress=False)
    write_shards(items, out, dataset="t", shard_size=10, workers=1, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "keep.txt", "manifest.json", "rejected.tsv", "shard-00000.idx", "shard-00000.tar"]


def test_csv_layout(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(3):
        sf.write(audio / f"clip{i}.wav", _noise(0.2, RATE, 1, seed=i), RATE)
    with_header = tmp_path / "meta.csv"
    with_header.write_text("label,path,fold\ncat,audio/clip0.wav,1\n\ndog,audio/clip1.wav,2\n")
    items = csv_items(with_header).items
    assert [(i.labels, i.fold, i.key) for i in items] == [
        (["cat"], 1, "audio_clip0_wav"), (["dog"], 2, "audio_clip1_wav")]
    assert items[0].path == str(audio / "clip0.wav")
    bare = tmp_path / "bare.csv"
    bare.write_text(f"audio/clip0.wav,cat,3\n{audio / 'clip2.wav'},dog\n")
    items = items_for_layout("csv", bare)
    assert [(i.labels, i.fold) for i in items] == [(["cat"], 3), (["dog"], None)]
    assert items[1].path == str(audio / "clip2.wav")
    write_shards(items, tmp_path / "out", dataset="c", workers=1, progress=False)
    folds = {meta["labels"][0]: meta["fold"] for _, meta, _, _ in _read_shards(tmp_path / "out")}
    assert folds == {"cat": 3, "dog": None}

    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,fold\naudio/clip0.wav,cat,1\naudio/clip1.wav,dog,first\n")
    with pytest.raises(ValueError, match="line 3: fold 'first' is a name, but .* line 2 has the integer fold 1"):
        csv_items(bad)  # named folds are fine (tests/dataio/writing/sources/test_named_folds.py), a mix of both is not
    bad.write_text("audio/clip0.wav,cat\naudio/clip1.wav\n")
    with pytest.raises(ValueError, match="line 2"):
        csv_items(bad)


def _cli(argv: list[str]) -> int:
    from trainer.cli import main
    return main(["shard", *argv])


def test_cli(audio_tree, tmp_path, capsys):
    assert _cli([str(tmp_path / "missing"), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("audioclr shard: error:") and "missing" in err
    (tmp_path / "empty").mkdir()
    assert _cli([str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "no audio clips" in capsys.readouterr().err
    assert _cli([str(audio_tree), "--layout", "nope", "--out", str(tmp_path / "o3")]) == 2
    assert "valid layouts: csv, folder" in capsys.readouterr().err

    out = tmp_path / "o4"
    argv = [str(audio_tree), "--out", str(out), "--workers", "1", "--shard-bytes", "64KB"]
    assert _cli(argv) == 0
    assert str(out / REJECTED_NAME) in capsys.readouterr().out
    assert load_manifest(out).dataset == audio_tree.name
    assert _cli(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert _cli(argv + ["--overwrite"]) == 0


def test_no_command_writes_over_its_own_input(audio_tree, tmp_path, capsys):
    """Issue 36, row 1: ``shard convert`` onto its source with --overwrite emptied it. An
    --out that is the input, however spelled, or inside it is refused before anything is
    touched, --overwrite included; a sibling or a parent is fine."""
    from dataio.writing.convert import convert_corpus
    from dataio.writing.shard_writer import Encoding, refuse_output_over_input

    corpus = tmp_path / "corpus"
    assert _cli([str(audio_tree), "--out", str(corpus), "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in corpus.iterdir()}
    (tmp_path / "link").symlink_to(corpus)
    for out in (corpus, f"{corpus}/", tmp_path / "corpus" / ".." / "corpus", tmp_path / "link", corpus / "pcm"):
        with pytest.raises(ShardWriteError, match="is the input .* or inside it"):
            convert_corpus(corpus, str(out), Encoding("pcm16"), overwrite=True, workers=1, progress=False)
        from trainer.cli import main
        assert main(["shard", "convert", str(corpus), "--format", "pcm16", "--out", str(out), "--overwrite"]) == 2
        assert "or inside it" in capsys.readouterr().err
        assert _cli([str(audio_tree), "--out", str(audio_tree / ".." / audio_tree.name), "--overwrite"]) == 2
        assert "or inside it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in corpus.iterdir() if p.name != "pcm"} == before
    assert not (corpus / "pcm").exists()
    refuse_output_over_input(corpus, tmp_path / "corpus-pcm")  # a sibling whose name starts alike
    refuse_output_over_input(corpus, tmp_path)  # a parent: --overwrite removes only its own files there
    refuse_output_over_input("s3://bucket/corpus", "s3://bucket/corpus-pcm")
    refuse_output_over_input("s3://bucket/corpus", "s3://other/corpus")
    for out in ("s3://bucket/corpus/", "s3://key:secret@bucket/corpus/pcm", "s3://bucket/corpus?v=1"):
        with pytest.raises(ShardWriteError, match="s3://bucket/corpus or inside it"):
            refuse_output_over_input("s3://bucket/corpus", out)


def test_parse_size():
    assert parse_size("64MB") == 64 << 20 and parse_size("1GB") == 1 << 30
    assert parse_size("500000") == 500000 and parse_size("2k") == 2048
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_cli_writes_to_a_url_shard_by_shard_and_the_manifest_last(audio_tree, tmp_path, capsys, monkeypatch):
    """--out file:///... goes through fsspec as s3:// or gs:// would: each shard uploaded as it
    is complete, the manifest last; what lands reads back as the same corpus as a folder."""
    import fsspec.implementations.local as local_fs

    uploads = []
    put = local_fs.LocalFileSystem.put_file

    def recording_put(self, lpath, rpath, **kwargs):
        uploads.append(Path(rpath).name)
        return put(self, lpath, rpath, **kwargs)
    monkeypatch.setattr(local_fs.LocalFileSystem, "put_file", recording_put)
    url = f"file://{tmp_path}/bucket/corpus"
    argv = [str(audio_tree), "--workers", "1", "--shard-bytes", "64KB", "--dataset", "tree"]
    assert _cli([*argv, "--out", url]) == 0
    printed = capsys.readouterr().out
    assert f"in {url}" in printed and f"{url}/{REJECTED_NAME}" in printed
    assert uploads[-1] == "manifest.json" and uploads.count("manifest.json") == 1
    assert uploads[:2] == ["shard-00000.tar", "shard-00000.idx"], "each shard goes up as it is complete"
    assert _cli([*argv, "--out", str(tmp_path / "folder")]) == 0
    remote, folder = load_manifest(url), load_manifest(tmp_path / "folder")
    assert remote.remote and [s.url for s in remote.shards] == [s.url for s in folder.shards]
    for a, b in zip(remote.shards, folder.shards):
        assert (tmp_path / "bucket" / "corpus" / a.url).read_bytes() == (tmp_path / "folder" / b.url).read_bytes()
    assert _cli([*argv, "--out", url]) == 2 and "already holds a corpus" in capsys.readouterr().err
    assert _cli([*argv, "--out", "http://127.0.0.1:9/x"]) == 2
    assert "http(s) URLs cannot be written" in capsys.readouterr().err


@pytest.mark.e2e
def test_check_shards_lists_a_truncated_shard_once(tmp_path):
    """A shard cut short, mid-member or at a member boundary (it then lacks the tar's
    end-of-archive blocks), stops the read: one line says so and how far it got (the
    members it then missed are not a second line)."""
    import subprocess

    from tests.conftest import PYTHON, cli_env
    from tests.shard_utils import make_shards

    make_shards(tmp_path, [4, 4, 4], seconds=0.3)
    for shard, member, cut in (("shard-00000.tar", "clip00002.flac", "header"),
                               ("shard-00001.tar", "clip00005.flac", "middle")):
        path = tmp_path / shard
        with tarfile.open(path) as tar:
            info = tar.getmember(member)
        end = info.offset if cut == "header" else info.offset_data + info.size // 2
        path.write_bytes(path.read_bytes()[:end])
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", str(tmp_path), "--workers", "1"],
                         env=cli_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert re.fullmatch(r"shard-00000.tar\tshard-00000.tar\tunreadable tar data after 2 of 4 members: "
                        r"TarFormatError: .* without the end-of-archive blocks \(truncated shard\?\)",
                        lines[0]), lines[0]
    assert re.fullmatch(r"shard-00001.tar\tshard-00001.tar\tunreadable tar data after \d+ of 4 members: "
                        r"TarFormatError: .* cut short .*\(truncated shard\?\)", lines[1]), lines[1]
    assert "3 shard(s) checked: 2 problem(s)" in out.stderr


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_stopped_or_full_write_leaves_no_tmp_and_rerunning_it_works(audio_tree, tmp_path, monkeypatch, stop):
    """Issue 36, row 2: a stopped (Ctrl-C, SIGTERM) or disk-full shard or convert left
    shard-*.tar.tmp behind, the stop line said to rerun the command and the rerun was
    refused; a full disk named no file. Now nothing .tmp is left, the message names the
    shard being written, and the same command again takes over the unfinished folder."""
    import tarfile

    from dataio.writing.convert import convert_corpus
    from dataio.writing.shard_writer import Encoding

    corpus = tmp_path / "corpus"
    assert _cli([str(audio_tree), "--out", str(corpus), "--workers", "1", "--shard-size", "2"]) == 0
    real, calls = tarfile.TarFile.addfile, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:  # after a shard or two: their tars complete, the next one open
            raise stop
        return real(self, *args, **kwargs)

    def attempts():
        yield "shard", lambda: write_shards(folder_items(audio_tree), tmp_path / "again", dataset="x", workers=1,
                                            shard_size=2, progress=False)
        yield "convert", lambda: convert_corpus(corpus, str(tmp_path / "pcm"), Encoding("pcm16"), workers=1,
                                                progress=False)
    for name, run in attempts():
        calls.clear()
        monkeypatch.setattr(tarfile.TarFile, "addfile", failing)
        with pytest.raises(type(stop)) as caught:
            run()
        monkeypatch.setattr(tarfile.TarFile, "addfile", real)
        out = tmp_path / ("again" if name == "shard" else "pcm")
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], name
        assert not (out / "manifest.json").exists() and any(out.glob("shard-*.tar")), name  # complete shards stay
        if isinstance(stop, OSError):
            assert caught.value.filename.endswith(".tar.tmp") and "shard-0000" in caught.value.filename
        run()  # the same command again, no --overwrite: the unfinished folder is taken over
        assert (out / "manifest.json").is_file(), name
    with pytest.raises(ShardWriteError, match="not empty: choose another folder or pass --overwrite to"):
        convert_corpus(corpus, str(tmp_path / "pcm"), Encoding("pcm16"), workers=1, progress=False)
