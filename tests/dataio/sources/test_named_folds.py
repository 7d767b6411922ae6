"""``--layout csv`` with named folds (kits, speakers, sites): numbered 1..N in sorted name
order in the clip JSON, the names kept in the manifest's ``fold_names``; integer folds as before."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from dataio.reading.manifest import load_manifest
from dataio.writing.sources import load_layout
from dataio.writing.sources.folder import csv_items

RATE = 16000


@pytest.fixture
def audio(tmp_path):
    folder = tmp_path / "audio"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(folder / f"hit{i}.flac", 0.3 * rng.standard_normal(RATE // 10).astype(np.float32), RATE)
    return folder


def _csv(tmp_path, folds: list[str], name: str = "meta.csv"):
    """A path,label,fold CSV (the layout of ../shared/data/percussion/meta.csv) over the 4 clips."""
    rows = "".join(f"audio/hit{i}.flac,{'kick' if i % 2 else 'snare'},{fold}\n" for i, fold in enumerate(folds))
    path = tmp_path / name
    path.write_text("path,label,fold\n" + rows)
    return path


def _shard(argv: list[str]) -> int:
    from trainer.cli import main
    return main(["shard", *argv])


def _clip_folds(folder) -> dict[str, int | None]:
    """Clip key -> the fold its shard JSON carries."""
    folds = {}
    for shard in load_manifest(folder).shard_paths():
        with tarfile.open(shard) as tar:
            for member in (m for m in tar.getmembers() if m.name.endswith(".json")):
                folds[member.name[: -len(".json")]] = json.loads(tar.extractfile(member).read())["fold"]
    return folds


def test_named_folds_are_numbered_in_sorted_order(tmp_path, audio):
    listing = csv_items(_csv(tmp_path, ["Bird", "Audiophob", "Bird", ""]))
    assert [item.fold for item in listing.items] == [2, 1, 2, None]
    assert listing.fold_names == {1: "Audiophob", 2: "Bird"}
    # the numbers follow the names, not the order of the rows
    again = csv_items(_csv(tmp_path, ["Audiophob", "Bird", "Audiophob", "Bird"], "other.csv"))
    assert [item.fold for item in again.items] == [1, 2, 1, 2]
    assert load_layout("csv", _csv(tmp_path, ["b", "a", "c", "a"], "third.csv")).fold_names == {1: "a", 2: "b", 3: "c"}


def test_integer_folds_are_unchanged(tmp_path, audio):
    listing = csv_items(_csv(tmp_path, ["3", "10", "", "03"]))
    assert [item.fold for item in listing.items] == [3, 10, None, 3]
    assert listing.fold_names == {}


def test_a_column_mixing_integers_and_names_is_refused(tmp_path, audio):
    with pytest.raises(ValueError, match=r"meta.csv line 4: fold 'Audiophob' is a name, but .*meta.csv line 2 "
                                         r"has the integer fold 1; the fold column must hold only integers or only"):
        csv_items(_csv(tmp_path, ["1", "2", "Audiophob", "2"]))


def test_cli_shards_named_folds_and_keeps_their_names(tmp_path, audio, capsys):
    out = tmp_path / "shards"
    assert _shard([str(_csv(tmp_path, ["Bird", "Audiophob", "Bird", "Cymbal"])), "--layout", "csv",
                   "--out", str(out), "--workers", "1"]) == 0
    assert "3 named folds numbered 1-3" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest.fold_names == {1: "Audiophob", 2: "Bird", 3: "Cymbal"}
    assert json.loads((out / "manifest.json").read_text())["fold_names"] == {"1": "Audiophob", "2": "Bird",
                                                                            "3": "Cymbal"}
    assert _clip_folds(out) == {"audio_hit0_flac": 2, "audio_hit1_flac": 1, "audio_hit2_flac": 2,
                                "audio_hit3_flac": 3}


def test_cli_integer_folds_write_the_manifest_as_before(tmp_path, audio, capsys):
    out = tmp_path / "shards"
    assert _shard([str(_csv(tmp_path, ["1", "2", "1", "2"])), "--layout", "csv", "--out", str(out),
                   "--workers", "1"]) == 0
    assert "named folds" not in capsys.readouterr().out
    assert "fold_names" not in json.loads((out / "manifest.json").read_text())
    assert load_manifest(out).fold_names == {}
    assert sorted(_clip_folds(out).values()) == [1, 1, 2, 2]


def test_cli_mixed_folds_exit_2_with_one_line(tmp_path, audio, capsys):
    assert _shard([str(_csv(tmp_path, ["1", "kitA", "1", "2"])), "--layout", "csv", "--out", str(tmp_path / "o"),
                   "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("audioclr shard: error:") and "only integers or only names" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_manifest_fold_names_are_optional(tmp_path):
    from dataio.errors import ManifestError
    from dataio.reading.manifest import Manifest, ShardInfo, parse_manifest

    plain = Manifest(dataset="d", sample_rate=16000, num_clips=1, shards=[ShardInfo("a.tar", 1)])
    assert "fold_names" not in plain.to_json()  # manifests without named folds are written as before
    assert parse_manifest(json.dumps(plain.to_json()), tmp_path, "m").fold_names == {}
    named = Manifest(dataset="d", sample_rate=16000, num_clips=1, shards=[ShardInfo("a.tar", 1)],
                     fold_names={2: "Bird", 1: "Audiophob"})
    assert named.to_json()["fold_names"] == {"1": "Audiophob", "2": "Bird"}
    assert parse_manifest(json.dumps(named.to_json()), tmp_path, "m").fold_names == {1: "Audiophob", 2: "Bird"}
    with pytest.raises(ManifestError, match="malformed manifest"):
        parse_manifest(json.dumps(named.to_json() | {"fold_names": ["Audiophob"]}), tmp_path, "m")
