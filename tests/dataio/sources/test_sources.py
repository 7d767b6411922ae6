"""Dataset layout converters on miniature trees with the real file names and CSV formats."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dataio.reading.manifest import load_manifest
from dataio.writing.shard_pipeline import write_shards
from dataio.writing.sources import MissingClip, items_for_layout, load_layout
from dataio.writing.sources.gtzan import split_counts

RATE = 8000  # the clips' rate and the shards' rate: nothing to resample


def _wav(path: Path, seed: int, seconds: float = 0.3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * RATE))
    sf.write(path, noise.astype(np.float32), RATE)


def _write(root: Path, relative: str, text: str) -> None:
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_text(text)


def _cli(argv: list[str]) -> int:
    from trainer.cli import main
    return main(["shard", *argv])


def _shard_json(folder: Path) -> dict[str, dict]:
    """Every clip's JSON in the shards of ``folder``, by key."""
    clips = {}
    for shard in load_manifest(folder).shard_paths():
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    clips[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    return clips


# ---------------------------------------------------------------- AudioSet

AS_LABELS = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/m/01j3sz,"Laughter"
3,/m/04rlf,"Music"
4,/m/0ngt1,"Thunder"
5,/t/dd00088,"Gush"
"""
AS_VOCABULARY = ["Speech", "Male speech, man speaking", "Laughter", "Music", "Thunder", "Gush"]


def _segments(rows: list[str], header: str = "# YTID, start_seconds, end_seconds, positive_labels"
              ) -> str:
    return ("# Segments csv created Sun Mar  5 10:54:31 2017\n"
            f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels=527, "
            "num_positive_labels=9\n" + header + "\n" + "".join(row + "\n" for row in rows))


@pytest.fixture(scope="module")
def audioset_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audioset")
    _write(root, "class_labels_indices.csv", AS_LABELS)
    _write(root, "balanced_train_segments.csv", _segments([
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"',
        '-0SdAVK79lg, 0.000, 10.000, "/m/04rlf"',
        '0FMdORf5iGs, 5.500, 15.500, "/m/05zppz,/m/09x0r,/m/01j3sz"']))
    _write(root, "unbalanced_train_segments.csv", _segments([
        'uNbAl123456, 30.000, 40.000, "/m/04rlf"']))
    _write(root, "eval_segments.csv", _segments([
        '0BTxbDsvPyE, 20.000, 30.000, "/m/0ngt1"',
        'zzGone12345, 10.000, 20.000, "/m/04rlf,/m/09x0r"']))
    # one clip per download convention; zzGone12345 was never downloaded
    for i, name in enumerate(["--PJHxphWEs.wav", "Y-0SdAVK79lg.wav", "0FMdORf5iGs_5.500_15.500.wav",
                              "uNbAl123456_30000_40000.flac", "eval_segments/0BTxbDsvPyE.wav"]):
        _wav(root / "audio" / name, seed=i)
    return root


def test_audioset_default_patterns(audioset_tree):
    listing = load_layout("audioset", audioset_tree)
    got = {Path(i.path).relative_to(audioset_tree / "audio").as_posix():
           (i.labels, i.split, i.subset, i.fold) for i in listing.items}
    assert got == {
        "--PJHxphWEs.wav": (["Speech", "Gush"], "train", "balanced_train", None),
        "Y-0SdAVK79lg.wav": (["Music"], "train", "balanced_train", None),
        "0FMdORf5iGs_5.500_15.500.wav":
            (["Male speech, man speaking", "Speech", "Laughter"], "train", "balanced_train", None),
        "uNbAl123456_30000_40000.flac": (["Music"], "train", "unbalanced_train", None),
        "eval_segments/0BTxbDsvPyE.wav": (["Thunder"], "test", "eval", None)}
    assert listing.missing == [MissingClip("zzGone12345", "eval_segments.csv")]
    assert listing.vocabulary == AS_VOCABULARY and listing.id_column == "ytid"

    chosen = load_layout("audioset", audioset_tree, subsets="balanced_train,eval")
    assert {i.subset for i in chosen.items} == {"balanced_train", "eval"}
    assert len(chosen.items) == 4
    with pytest.raises(ValueError, match="balanced_train, unbalanced_train, eval"):
        load_layout("audioset", audioset_tree, subsets="balanced")


def test_audioset_pattern_and_audio_dir(audioset_tree, tmp_path):
    only_plain = load_layout("audioset", audioset_tree, audio_pattern="{ytid}.wav")
    assert [Path(i.path).name for i in only_plain.items] == ["--PJHxphWEs.wav"]
    assert len(only_plain.missing) == 5
    _wav(tmp_path / "dl" / "--PJHxphWEs_30.000_40.000.flac", seed=9)
    _wav(tmp_path / "dl" / "0BTxbDsvPyE_20.000_30.000.flac", seed=10)
    elsewhere = load_layout("audioset", audioset_tree, audio_dir=tmp_path / "dl",
                            audio_pattern="{ytid}_{start}_{end}.flac", subsets=["eval"])
    assert [(Path(i.path).name, i.labels) for i in elsewhere.items] == [
        ("0BTxbDsvPyE_20.000_30.000.flac", ["Thunder"])]
    assert [m.clip for m in elsewhere.missing] == ["zzGone12345"]
    with pytest.raises(ValueError, match=r"\{nope\}|'nope'"):
        load_layout("audioset", audioset_tree, audio_pattern="{nope}.wav")


def test_audioset_unknown_mid_names_it_and_the_line(tmp_path):
    _write(tmp_path, "class_labels_indices.csv", AS_LABELS)
    _write(tmp_path, "eval_segments.csv", _segments([
        '0BTxbDsvPyE, 20.000, 30.000, "/m/0ngt1"', 'abcdefghijk, 0.000, 10.000, "/m/09x0r,/m/zzz"']))
    with pytest.raises(ValueError, match=r"eval_segments\.csv line 5.*/m/zzz"):
        load_layout("audioset", tmp_path)


def test_audioset_end_to_end(audioset_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    argv = [str(audioset_tree), "--layout", "audioset", "--out", str(out), "--workers", "1",
            "--sample-rate", str(RATE)]
    assert _cli(argv) == 0
    assert "1 listed clips missing on disk" in capsys.readouterr().out
    assert (out / "missing.tsv").read_text() == "ytid\tcsv\nzzGone12345\teval_segments.csv\n"
    manifest = load_manifest(out)
    assert manifest.vocabulary == AS_VOCABULARY and manifest.multi_label
    clips = _shard_json(out)
    assert sorted(clips) == ["Y--PJHxphWEs", "Y-0SdAVK79lg", "Y0BTxbDsvPyE", "Y0FMdORf5iGs",
                             "YuNbAl123456"]
    first = clips["Y--PJHxphWEs"]
    assert (first["labels"], first["split"], first["fold"], first["subset"]) == (
        ["Speech", "Gush"], "train", None, "balanced_train")
    assert (clips["Y0BTxbDsvPyE"]["split"], clips["Y0BTxbDsvPyE"]["subset"]) == ("test", "eval")
    assert first["duration"] == pytest.approx(0.3)


# ---------------------------------------------------------------- FSD50K

FSD_VOCABULARY = ["Accelerating_and_revving_and_vroom", "Music", "Electric_guitar", "Guitar",
                  "Bark", "Dog"]


@pytest.fixture(scope="module")
def fsd50k_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsd50k")
    mids = ["/m/07q2z82", "/m/04rlf", "/m/02sgy", "/m/0342h", "/m/05tny_", "/m/0bt9lr"]
    _write(root, "FSD50K.ground_truth/vocabulary.csv",
           "".join(f"{i},{name},{mid}\n" for i, (name, mid) in enumerate(zip(FSD_VOCABULARY, mids))))
    _write(root, "FSD50K.ground_truth/dev.csv", "fname,labels,mids,split\n"
           '64760,"Electric_guitar,Guitar,Music","/m/02sgy,/m/0342h,/m/04rlf",train\n'
           '16399,"Bark,Dog","/m/05tny_,/m/0bt9lr",val\n'
           "11111,Accelerating_and_revving_and_vroom,/m/07q2z82,train\n"
           "99999,Music,/m/04rlf,train\n")
    _write(root, "FSD50K.ground_truth/eval.csv", 'fname,labels,mids\n37199,"Dog",/m/0bt9lr\n')
    for i, fname in enumerate(["64760", "16399", "11111"]):
        _wav(root / "FSD50K.dev_audio" / f"{fname}.wav", seed=i)
    _wav(root / "FSD50K.eval_audio" / "37199.wav", seed=5)
    return root


def test_fsd50k_items(fsd50k_tree):
    listing = load_layout("fsd50k", fsd50k_tree)
    assert [(i.key, i.labels, i.split, i.fold) for i in listing.items] == [
        ("dev_64760", ["Electric_guitar", "Guitar", "Music"], "train", None),
        ("dev_16399", ["Bark", "Dog"], "val", None),
        ("dev_11111", ["Accelerating_and_revving_and_vroom"], "train", None),
        ("eval_37199", ["Dog"], "test", None)]
    assert listing.missing == [MissingClip("99999", "dev.csv")]
    assert listing.vocabulary == FSD_VOCABULARY
    assert items_for_layout("fsd50k", fsd50k_tree) == listing.items


def test_fsd50k_end_to_end(fsd50k_tree, tmp_path, capsys):
    out = tmp_path / "shards"
    assert _cli([str(fsd50k_tree), "--layout", "fsd50k", "--out", str(out), "--workers", "1",
                 "--sample-rate", str(RATE), "--dataset", "fsd50k"]) == 0
    assert "1 listed clips missing on disk" in capsys.readouterr().out
    assert (out / "missing.tsv").read_text() == "fname\tcsv\n99999\tdev.csv\n"
    manifest = load_manifest(out)
    assert manifest.vocabulary == FSD_VOCABULARY and manifest.multi_label
    assert manifest.dataset == "fsd50k" and manifest.num_clips == 4
    clips = _shard_json(out)
    assert {key: (c["labels"], c["split"], c["fold"]) for key, c in clips.items()} == {
        "dev_64760": (["Electric_guitar", "Guitar", "Music"], "train", None),
        "dev_16399": (["Bark", "Dog"], "val", None),
        "dev_11111": (["Accelerating_and_revving_and_vroom"], "train", None),
        "eval_37199": (["Dog"], "test", None)}
    assert all("subset" not in c for c in clips.values())
    assert sorted(c["index"] for c in clips.values()) == [0, 1, 2, 3]


# ---------------------------------------------------------------- FSDnoisy18k

@pytest.fixture(scope="module")
def fsdnoisy_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdnoisy18k")
    _write(root, "FSDnoisy18k.meta/train.csv",
           "fname,label,aso_id,manually_verified,noisy_small\n"
           "00016e1e.wav,Walk_or_footsteps,/m/07pbtc8,0,1\n"
           "0a1b2c3d.wav,Rain,/m/06mb1,1,0\n"
           "0b2c3d4e.wav,Rain,/m/06mb1,0,0\n"
           "0c3d4e5f.wav,Walk_or_footsteps,/m/07pbtc8,1,1\n"
           "0d4e5f60.wav,Rain,/m/06mb1,0,0\n")
    _write(root, "FSDnoisy18k.meta/test.csv",
           "fname,label,aso_id\n1a2b3c4d.wav,Rain,/m/06mb1\n")
    for i, name in enumerate(["00016e1e.wav", "0a1b2c3d.wav", "0b2c3d4e.wav", "0c3d4e5f.wav"]):
        _wav(root / "FSDnoisy18k.audio_train" / name, seed=i)
    _wav(root / "FSDnoisy18k.audio_test" / "1a2b3c4d.wav", seed=7)
    return root


def test_fsdnoisy18k_subsets(fsdnoisy_tree, tmp_path):
    listing = load_layout("fsdnoisy18k", fsdnoisy_tree)
    assert [(Path(i.path).name, i.labels, i.split, i.subset) for i in listing.items] == [
        ("00016e1e.wav", ["Walk_or_footsteps"], "train", "noisy_small"),
        ("0a1b2c3d.wav", ["Rain"], "train", "clean"),
        ("0b2c3d4e.wav", ["Rain"], "train", "noisy"),
        ("0c3d4e5f.wav", ["Walk_or_footsteps"], "train", "clean"),
        ("1a2b3c4d.wav", ["Rain"], "test", "test")]
    assert listing.missing == [MissingClip("0d4e5f60.wav", "train.csv")]
    chosen = load_layout("fsdnoisy18k", fsdnoisy_tree, subsets="clean,noisy_small")
    assert [i.subset for i in chosen.items] == ["noisy_small", "clean", "clean", "test"]
    assert chosen.missing == []  # the missing clip is noisy, which was not asked for
    with pytest.raises(ValueError, match="clean, noisy_small, noisy"):
        load_layout("fsdnoisy18k", fsdnoisy_tree, subsets="dirty")

    write_shards(chosen.items, tmp_path / "out", dataset="n", workers=1, sample_rate=RATE,
                 progress=False)
    subsets = Counter(c["subset"] for c in _shard_json(tmp_path / "out").values())
    assert subsets == {"clean": 2, "noisy_small": 1, "test": 1}


# ---------------------------------------------------------------- ESC-50, US8K

@pytest.fixture(scope="module")
def esc50_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("esc50")
    _write(root, "meta/esc50.csv", "filename,fold,target,category,esc10,src_file,take\n"
           "1-100032-A-0.wav,1,0,dog,True,100032,A\n"
           "1-100038-A-14.wav,1,14,chirping_birds,False,100038,A\n"
           "2-109505-A-21.wav,2,21,sneezing,False,109505,A\n"
           "5-9032-A-0.wav,5,0,dog,True,9032,A\n"
           "3-170015-A-1.wav,3,1,rooster,True,170015,A\n")
    for i, name in enumerate(["1-100032-A-0.wav", "1-100038-A-14.wav", "2-109505-A-21.wav",
                              "5-9032-A-0.wav"]):
        _wav(root / "audio" / name, seed=i)
    return root


def test_esc50_and_esc10(esc50_tree):
    listing = load_layout("esc50", esc50_tree)
    assert [(i.key, i.labels, i.fold, i.split) for i in listing.items] == [
        ("1-100032-A-0", ["dog"], 1, "train"), ("1-100038-A-14", ["chirping_birds"], 1, "train"),
        ("2-109505-A-21", ["sneezing"], 2, "train"), ("5-9032-A-0", ["dog"], 5, "train")]
    assert listing.missing == [MissingClip("3-170015-A-1.wav", "esc50.csv")]
    assert listing.vocabulary == ["dog", "rooster", "chirping_birds", "sneezing"]  # by target
    esc10 = load_layout("esc50", esc50_tree, esc10=True)
    assert [(i.labels, i.fold) for i in esc10.items] == [(["dog"], 1), (["dog"], 5)]
    assert esc10.vocabulary == ["dog", "rooster"] and len(esc10.missing) == 1


def test_us8k(tmp_path):
    _write(tmp_path, "metadata/UrbanSound8K.csv",
           "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
           "100032-3-0-0.wav,100032,0.0,0.317551,1,5,3,dog_bark\n"
           "100263-2-0-117.wav,100263,58.5,62.5,1,5,2,children_playing\n"
           "101415-3-0-2.wav,101415,1.0,5.0,1,1,3,dog_bark\n"
           "102305-6-0-0.wav,102305,0.0,2.6,1,10,6,gun_shot\n")
    for i, name in enumerate(["fold5/100032-3-0-0.wav", "fold5/100263-2-0-117.wav",
                              "fold1/101415-3-0-2.wav", "fold1/102305-6-0-0.wav"]):
        _wav(tmp_path / "audio" / name, seed=i)  # the last one is in the wrong fold folder
    listing = load_layout("us8k", tmp_path)
    assert [(i.key, i.labels, i.fold, i.split) for i in listing.items] == [
        ("100032-3-0-0", ["dog_bark"], 5, "train"),
        ("100263-2-0-117", ["children_playing"], 5, "train"),
        ("101415-3-0-2", ["dog_bark"], 1, "train")]
    assert listing.missing == [MissingClip("102305-6-0-0.wav", "UrbanSound8K.csv")]
    assert listing.vocabulary == ["children_playing", "dog_bark", "gun_shot"]


# ---------------------------------------------------------------- GTZAN

def _gtzan(root: Path, genres: tuple[str, ...], per_genre: int = 20) -> Path:
    for genre in genres:
        folder = root / "genres" / genre
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_genre):
            (folder / f"{genre}.{n:05d}.wav").write_bytes(b"")  # listing only: never read
        (folder / "README.txt").write_text("not audio")
    return root


def _splits(items) -> dict[str, str]:
    return {Path(i.path).name: i.split for i in items}


def test_gtzan_split_is_seeded_and_stratified(tmp_path):
    root = _gtzan(tmp_path / "two", ("jazz", "blues"))
    items = load_layout("gtzan", root).items
    assert len(items) == 40 and {i.labels[0] for i in items} == {"jazz", "blues"}
    for genre in ("jazz", "blues"):
        counts = Counter(i.split for i in items if i.labels == [genre])
        assert counts == {"train": 14, "val": 3, "test": 3}
    assert split_counts(100) == {"train": 70, "val": 15, "test": 15}
    assert _splits(load_layout("gtzan", root, split_seed=0).items) == _splits(items)
    assert _splits(load_layout("gtzan", root, split_seed=1).items) != _splits(items)
    # one genre's split does not depend on the other genres
    jazz_only = load_layout("gtzan", _gtzan(tmp_path / "one", ("jazz",))).items
    assert _splits(jazz_only).items() <= _splits(items).items()
    assert items[0].key == "blues_00000" and load_layout("gtzan", root).missing == []
    assert _splits(load_layout("gtzan", root / "genres").items) == _splits(items)  # SRC=genres/


# ---------------------------------------------------------------- errors and the CLI

@pytest.mark.parametrize("layout, relative, text, expected", [
    ("audioset", "eval_segments.csv", _segments(["a, 0, 1, x"], header="# YTID, start, end, labels"),
     "YTID,start_seconds,end_seconds,positive_labels"),
    ("fsd50k", "FSD50K.ground_truth/dev.csv", "fname,labels,mids\n1,Music,/m/04rlf\n",
     "fname,labels,mids,split"),
    ("fsdnoisy18k", "FSDnoisy18k.meta/train.csv", "fname,label\na.wav,Rain\n",
     "fname,label,aso_id,manually_verified,noisy_small"),
    ("esc50", "meta/esc50.csv", "filename,fold,category\na.wav,1,dog\n",
     "filename,fold,target,category,esc10,src_file,take"),
    ("us8k", "metadata/UrbanSound8K.csv", "file,class\na.wav,dog_bark\n",
     "slice_file_name,fsID,start,end,salience,fold,classID,class"),
])
def test_wrong_header_names_file_and_expected_header(tmp_path, layout, relative, text, expected):
    _write(tmp_path, "class_labels_indices.csv", AS_LABELS)
    _write(tmp_path, "FSD50K.ground_truth/vocabulary.csv", "0,Music,/m/04rlf\n")
    _write(tmp_path, relative, text)
    with pytest.raises(ValueError) as caught:
        load_layout(layout, tmp_path)
    assert str(tmp_path / relative) in str(caught.value) and expected in str(caught.value)


def test_vocabulary_csv_with_header_is_refused(fsd50k_tree, tmp_path):
    _write(tmp_path, "FSD50K.ground_truth/vocabulary.csv", "index,label,mid\n0,Music,/m/04rlf\n")
    with pytest.raises(ValueError, match=r"vocabulary\.csv line 1.*no header"):
        load_layout("fsd50k", tmp_path)


def test_cli_layout_options(esc50_tree, fsdnoisy_tree, tmp_path, capsys):
    def run(src: Path, *extra: str) -> int:
        return _cli([str(src), "--out", str(tmp_path / "o"), "--workers", "1",
                     "--sample-rate", str(RATE), "--overwrite", *extra])

    assert run(esc50_tree, "--layout", "us8k", "--esc10") == 2
    err = capsys.readouterr().err
    assert "--esc10" in err and "us8k" in err and err.startswith("audioclr shard: error:")
    assert run(esc50_tree, "--layout", "esc50", "--split-seed", "3") == 2
    assert "--split-seed" in capsys.readouterr().err
    assert run(esc50_tree, "--layout", "esc50", "--esc10") == 0
    assert load_manifest(tmp_path / "o").vocabulary == ["dog", "rooster"]
    assert run(fsdnoisy_tree, "--layout", "fsdnoisy18k", "--subsets", "clean") == 0
    assert Counter(c["subset"] for c in _shard_json(tmp_path / "o").values()) == {
        "clean": 2, "test": 1}
    assert "0 listed" not in capsys.readouterr().out
    assert (tmp_path / "o" / "missing.tsv").read_text() == "fname\tcsv\n"
    with pytest.raises(ValueError, match="'esc10' does not apply to layout folder"):
        load_layout("folder", esc50_tree, esc10=True)
