"""A run's checkpoints: a pickle planted in one is refused and never run, a damaged newest one
is set aside and the resume stays exact, a resume target that is no checkpoint exits 2, a full
disk while saving keeps the last good one. (Moved from tests/trainer/faults/test_faults.py;
killed-and-resumed runs: test_resume.py beside this file.)"""

import hashlib
import json
import resource
from pathlib import Path

import pytest
import torch

from tests.conftest import checkpoint_weights
from tests.trainer.faults.test_faults import Payload, _plain_error, _pretrain
from trainer.train.checkpoint import verify

pytestmark = pytest.mark.e2e


def _reseal(folder: Path) -> None:
    """Rewrite the checkpoint's sha256 sums, as someone planting a file would."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in meta["sha256"]}
    (folder / "meta.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------- no code from files
@pytest.mark.parametrize("planted", ["state.pt", "rank_00000.pt", "engine/optimizer.pt"])
def test_a_pickled_object_planted_in_a_checkpoint_is_refused_and_never_run(tiny_shards, tmp_path, planted):
    run_dir, marker = tmp_path / "run", tmp_path / "code_ran"
    _plain_error(_pretrain(tiny_shards, run_dir, "train.max_steps=2"), 0)
    folder = run_dir / "checkpoints" / "step_00000002"
    torch.save({"engine": Payload(marker)}, folder / planted)
    _reseal(folder)
    err = _plain_error(_pretrain(tiny_shards, run_dir, "train.max_steps=3"), 1)
    assert not marker.exists()
    assert f"{folder / planted}: refused" in err and "never unpickles" in err


# ---------------------------------------------------------------------- verified checkpoints
def test_damaged_newest_checkpoint_is_set_aside_and_resume_stays_exact(tiny_shards, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _plain_error(_pretrain(tiny_shards, ref, "train.max_steps=6"), 0)
    keep = ("train.max_steps=6", "train.ckpt_every=2", "train.keep_last=3")
    _plain_error(_pretrain(tiny_shards, run, *keep), 0)
    ckpts = run / "checkpoints"
    with open(ckpts / "step_00000006" / "state.pt", "r+b") as f:
        f.truncate(1000)  # a crash of the storage after the rename
    (ckpts / "step_00000004" / "rank_00000.pt").write_bytes(b"\0" * 64)
    err = _plain_error(_pretrain(tiny_shards, run, *keep), 0)
    assert "step_00000006 is damaged: state.pt does not match its sha256" in err
    assert "step_00000004 is damaged: rank_00000.pt" in err and "resumed from" in err
    assert (ckpts / "step_00000006.damaged").is_dir() and (ckpts / "step_00000004.damaged").is_dir()
    assert verify(ckpts / "step_00000006") is None
    a, b = (checkpoint_weights(d / "checkpoints" / "step_00000006") for d in (ref, run))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_resume_from_a_named_folder_that_is_not_a_checkpoint_exits_2(tiny_shards, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for target, words in ((a_file, "it is a file"), (tmp_path / "missing", "does not exist"),
                          (tmp_path, "no meta.json")):
        err = _plain_error(_pretrain(tiny_shards, tmp_path / "run", "train.max_steps=1",
                                     f"train.resume={target}"), 2)
        assert "train.resume: " in err and words in err, err


def _file_size_limit(limit: int):
    def apply():  # Python ignores SIGXFSZ, so an oversized write fails with EFBIG as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_saving_stops_the_run_and_keeps_the_last_checkpoint(tiny_shards, tmp_path):
    run = tmp_path / "run"
    _plain_error(_pretrain(tiny_shards, run, "train.max_steps=2"), 0)
    good = run / "checkpoints" / "step_00000002"
    size = (good / "engine" / "weights.safetensors").stat().st_size
    err = _plain_error(_pretrain(tiny_shards, run, "train.max_steps=4", preexec=_file_size_limit(size // 2)), 1)
    assert "could not write checkpoint" in err and "step_00000004" in err, err
    assert "the last good checkpoint (step_00000002) is unchanged" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert verify(good) is None
