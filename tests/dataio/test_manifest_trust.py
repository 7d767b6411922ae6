"""The reader trusts the shards over the manifest's counts (issue 36, row 4): a manifest
that undercounts but agrees with itself used to train silently, with clip indices beyond
``num_clips`` going into NPID's memory bank. A shard holding more members than listed, or
a clip index outside the corpus, now stops the run naming the shard; a shard holding fewer
is trained on what it holds, with a warning naming it."""

import importlib.util
import json
import logging
import subprocess

import pytest

from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, LoaderFailure, Placement, steps_per_epoch
from dataio.backends.torch_pipeline import wave_loader
from dataio.errors import ShardMismatch
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest
from tests.conftest import PYTHON, cli_env, tiny_overrides
from tests.shard_utils import make_shards, rewrite_members, write_dali_indexes

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")


def _edit_manifest(folder, change) -> None:
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _undercount(raw: dict) -> None:
    """The issue's case: shard 0 listed with 2 of its 6 clips, num_clips lowered to agree."""
    raw["shards"][0]["count"] = 2
    raw["num_clips"] = sum(s["count"] for s in raw["shards"])


def _one_epoch(folder) -> list[dict]:
    manifest = load_manifest(folder)
    cfg = DataConfig(shards=str(folder), batch_size=4, num_workers=0, view_seconds=0.5)
    aug = build_augmenter({}, FrontendConfig(n_mels=32), 0.5, num_views=2, pairs_per_clip=1, seed=3)
    place = Placement(seed=3, steps=steps_per_epoch(cfg, manifest, 1))
    batches = list(wave_loader(cfg, manifest, aug, place, epoch=0, start_step=0, in_workers=False))
    failed = [b.message for b in batches if isinstance(b, LoaderFailure)]  # how a loader worker hands errors over
    if failed:
        raise ShardMismatch(failed[0])
    return batches


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    make_shards(folder, [6, 6, 6, 6], seconds=0.8)
    write_dali_indexes(folder)
    return folder


def test_a_shard_holding_more_than_its_manifest_lists_stops_the_reader_naming_it(shards):
    _one_epoch(shards)  # the corpus as written reads
    _edit_manifest(shards, _undercount)
    with pytest.raises(ShardMismatch, match=r"shard-0000\d\.tar .*(more samples than the 2|outside the 0\.\.19)"):
        _one_epoch(shards)


def test_a_clip_index_beyond_num_clips_stops_the_reader_naming_the_clip_and_shard(shards):
    def change(name: str, payload: bytes) -> bytes:
        if name == "clip00013.json":
            return json.dumps({**json.loads(payload), "index": 24}).encode()
        return payload
    rewrite_members(shards, change)
    with pytest.raises(ShardMismatch, match=r"clip clip00013 of shard shard-00002\.tar has index 24, outside the "
                                            r"0\.\.23"):
        _one_epoch(shards)


def test_a_shard_holding_fewer_than_listed_is_read_with_a_warning_naming_it(shards, caplog):
    def overcount(raw: dict) -> None:  # indices stay inside the corpus: safe to train on
        raw["shards"][3]["count"] = 7
        raw["shards"][2]["count"] = 5
    _edit_manifest(shards, overcount)
    with pytest.raises(ShardMismatch, match=r"shard-00002\.tar holds more samples than the 5"):
        _one_epoch(shards)
    _edit_manifest(shards, lambda raw: raw["shards"][2].update(count=6) or raw.update(num_clips=25))
    with caplog.at_level(logging.WARNING, logger="dataio.backends.torch_pipeline"):
        batches = _one_epoch(shards)
    assert batches and "shard-00003.tar holds 6 of the 7 samples its manifest lists" in caplog.text


@pytest.mark.e2e
def test_the_issue_case_npid_stops_with_a_line_naming_the_shard_on_both_back_ends(shards, tmp_path):
    _edit_manifest(shards, _undercount)

    def pretrain(run: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "trainer.cli", "pretrain", "--config", "configs/demo_npid.yaml",
                               *tiny_overrides(shards, tmp_path / run), "train.epochs=1", *extra],
                              env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
    out = pretrain("torch")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "does not describe its shards" in out.stderr
    assert "shard-0000" in out.stderr and "check-shards" in out.stderr
    if importlib.util.find_spec("nvidia.dali") is not None:
        out = pretrain("dali", "data.backend=dali")
        assert out.returncode == 2, out.stderr[-2000:]
        assert "shard-00000.tar" in out.stderr and "its DALI index lists 6 samples, its manifest 2" in out.stderr
        assert "Traceback" not in out.stderr
