"""Faults injected on purpose: planted code, bad data, signals (damaged checkpoints and a
full disk while saving: tests/trainer/checkpoint/test_checkpoint.py). Each ends with a
message naming the problem and a known exit code, within a time limit (a hang fails the
test), and never runs code from a file."""

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, cli_env, tiny_overrides
from tests.dist_utils import free_port
from tests.shard_utils import make_shards, rewrite_members, write_dali_indexes
from trainer.train.checkpoint import CheckpointError, load_tensors, verify

LIMIT = 240  # seconds any one command may take; a hang fails the test


class Payload:
    """Unpickling this makes the folder ``marker``: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pretrain(shards, run_dir, *extra, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(shards, run_dir), *extra],
                          env=cli_env(), capture_output=True, text=True, timeout=LIMIT, preexec_fn=preexec)


def _plain_error(out: subprocess.CompletedProcess, code: int) -> str:
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr


# ---------------------------------------------------------------------- no code from files
@pytest.mark.e2e
def test_planted_pretrained_weights_are_refused_with_exit_2(tiny_shards, tmp_path):
    weights, marker = tmp_path / "weights.pt", tmp_path / "code_ran"
    torch.save({"conv1.weight": Payload(marker)}, weights)
    err = _plain_error(_pretrain(tiny_shards, tmp_path / "run", "train.max_steps=1",
                                 f"model.pretrained={weights}"), 2)
    assert not marker.exists() and f"model.pretrained: {weights}: refused" in err


@pytest.mark.e2e
def test_eval_refuses_an_encoder_file_that_is_a_pickle(tiny_shards, tmp_path):
    from tests.conftest import export_random_encoder

    export_random_encoder(tmp_path, width=4)
    marker = tmp_path / "code_ran"
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "encoder.safetensors")
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "eval", "--run", str(tmp_path), "--data", str(tiny_shards)],
                         env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    err = _plain_error(out, 2)
    assert not marker.exists() and f"{tmp_path / 'encoder.safetensors'}: unreadable" in err, err


def test_a_sweep_trial_state_and_searcher_state_are_never_unpickled(tmp_path):
    from trainer.tune.ray_cluster import set_aside_damaged_state

    marker = tmp_path / "code_ran"
    torch.save({"runner": Payload(marker)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt: refused"):
        load_tensors(tmp_path / "state.pt")
    import pickle
    good = pickle.dumps(Payload(marker))
    (tmp_path / "basic-variant-state-1.json").write_bytes(good)
    (tmp_path / "basic-variant-state-2.json").write_bytes(good[: len(good) // 2])
    damaged = set_aside_damaged_state(tmp_path)
    assert [p.name for p in damaged] == ["basic-variant-state-2.json"]
    assert not marker.exists()


@pytest.mark.e2e
def test_a_run_dir_that_is_a_file_or_under_a_file_exits_2(tiny_shards, tmp_path):
    (tmp_path / "taken").write_text("x")
    for run_dir, words in ((tmp_path / "taken", "is a file, not a folder"),
                           (tmp_path / "taken" / "run", "cannot write into")):
        err = _plain_error(_pretrain(tiny_shards, run_dir, "train.max_steps=1"), 2)
        assert "run_dir: " in err and str(run_dir) in err and words in err, err


# ---------------------------------------------------------------------- shard writing
@pytest.mark.e2e
def test_shard_writer_survives_every_bad_file_and_counts_it_in_the_manifest(tmp_path):
    import numpy as np
    import soundfile as sf

    src = tmp_path / "src"
    for label in ("hit", "note"):
        (src / label).mkdir(parents=True)
        for i in range(3):
            sf.write(src / label / f"{i}.wav", np.random.default_rng(i).normal(0, 0.1, 8000), 16000)
    os.rename(src / "hit" / "0.wav", os.fsencode(src / "hit") + b"/caf\xe9.wav")  # a Latin-1 name
    sf.write(src / "hit" / "click.wav", np.ones(480) * 0.1, 16000)  # 30 ms: kept
    sf.write(src / "hit" / "tick.wav", np.ones(160) * 0.1, 16000)  # 10 ms: too short
    (src / "note" / "garbage.flac").write_bytes(os.urandom(3000))
    (src / "note" / "empty.wav").write_bytes(b"")
    (src / "note" / "folder.wav").mkdir()  # not a file: not listed
    wav = (src / "note" / "1.wav").read_bytes()
    (src / "note" / "cut.wav").write_bytes(wav[:40])  # the header only
    sf.write(src / "note" / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "shard", "--layout", "folder", "--out", str(tmp_path / "shards"),
                          "--workers", "1", str(src)], env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_clips"] == 7  # 6 good (one with a non-UTF-8 name) + the 30 ms click
    assert manifest["rejected"]["clips"] == 5 and manifest["rejected"]["list"] == "rejected.tsv"
    rejected = (tmp_path / "shards" / "rejected.tsv").read_text(encoding="utf-8")
    for words in ("tick.wav\ttoo short", "garbage.flac\tunreadable", "empty.wav\tunreadable: empty file",
                  "cut.wav\tunreadable", "nan.wav\tnon-finite"):
        assert words in rejected, (words, rejected)


# ---------------------------------------------------------------------- data that cannot train
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]


def _noise(name: str, payload: bytes) -> bytes:
    return os.urandom(len(payload)) if name.endswith(".flac") else payload


BAD_DATA = {  # name: (how the shards are spoiled, what the message says on torch, on DALI)
    "empty_shards": (None, "no readable clip in shard(s)", "no readable shard"),
    "json_unparsable": (lambda n, p: b'{"index": 3, "labels": [' if n.endswith(".json") else p,
                        "no usable clip in a whole pass", "malformed clip JSON"),
    "json_without_index": (lambda n, p: b'{"labels": ["c1"]}' if n.endswith(".json") else p,
                           "no usable clip in a whole pass", "malformed clip JSON"),
    "audio_garbage": (_noise, "no usable clip in a whole pass", "DALI stopped on a clip"),
}


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    make_shards(folder, [6, 6, 6, 6], seconds=0.8)
    write_dali_indexes(folder)
    return folder


def _spoiled(good: Path, folder: Path, case: str) -> Path:
    shutil.copytree(good, folder)
    change = BAD_DATA[case][0]
    if change is None:
        for tar in folder.glob("*.tar"):
            tar.write_bytes(b"")
    else:
        rewrite_members(folder, change)
    return folder


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_data_that_cannot_train_stops_within_seconds_with_a_message(good_shards, tmp_path, case, backend):
    shards = _spoiled(good_shards, tmp_path / "shards", case)
    start = time.time()
    out = _pretrain(shards, tmp_path / "run", "train.max_steps=3", f"data.backend={backend}")
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert BAD_DATA[case][1 if backend == "torch" else 2] in out.stderr, out.stderr[-3000:]
    assert time.time() - start < 120
    if case != "empty_shards":
        check = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", str(shards), "--workers", "1"],
                               env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
        assert check.returncode == 1 and "24 problem(s)" in check.stderr, check.stderr[-2000:]


@pytest.mark.e2e
def test_check_shards_catches_a_wrong_sample_rate_and_empty_audio(tmp_path):
    make_shards(tmp_path / "a", [3], rate=8000)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["sample_rate"] = 16000
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", str(tmp_path / "a"), "--workers", "1"],
                         env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert out.returncode == 1 and out.stdout.count("audio at 8000 Hz, the manifest says 16000 Hz") == 3
    make_shards(tmp_path / "b", [3, 3])
    write_dali_indexes(tmp_path / "b")
    import io

    import soundfile as sf
    silent = io.BytesIO()
    sf.write(silent, [], 16000, format="WAV", subtype="PCM_16")  # decodes to 0 samples
    rewrite_members(tmp_path / "b", lambda n, p: silent.getvalue() if n == "clip00001.flac" else p)
    (tmp_path / "b" / "shard-00001.idx").unlink()
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", str(tmp_path / "b"), "--workers", "1"],
                         env=cli_env(), capture_output=True, text=True, timeout=LIMIT)
    assert out.returncode == 1 and "clip00001\tempty audio" in out.stdout and "DALI index file missing" in out.stdout


def _torchrun(shards, run_dir, *extra) -> subprocess.CompletedProcess:
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [PYTHON, "-m", "torch.distributed.run"]
    return subprocess.run([*launcher, "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           "-m", "trainer.cli.pretrain", *tiny_overrides(shards, run_dir), *extra],
                          env=cli_env(), capture_output=True, text=True, timeout=LIMIT)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_shard_two_ranks_trains_with_the_clips_split(tmp_path, backend):
    make_shards(tmp_path / "one", [16], seconds=0.8)
    write_dali_indexes(tmp_path / "one")
    out = _torchrun(tmp_path / "one", tmp_path / "run", "train.max_steps=4", f"data.backend={backend}")
    assert out.returncode == 0, out.stderr[-3000:]
    if backend == "torch":  # DALI's reader splits the samples of its shards across ranks itself
        assert "1 shard(s) for 2 ranks: every rank reads every shard" in out.stderr
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


@pytest.mark.e2e
def test_a_rank_whose_data_is_unreadable_ends_every_rank(good_shards, tmp_path):
    shards = tmp_path / "half"
    shutil.copytree(good_shards, shards)
    for tar in sorted(shards.glob("*.tar"))[1::2]:  # ranks read every other shard: one rank gets none
        tar.write_bytes(b"")
    for seed in range(20):  # a seed whose epoch-0 order gives one rank both empty shards
        import numpy as np
        order = np.random.default_rng((seed, 0)).permutation(4)
        if {int(order[0]), int(order[2])} == {1, 3} or {int(order[1]), int(order[3])} == {1, 3}:
            break
    start = time.time()
    out = _torchrun(shards, tmp_path / "run", "train.max_steps=4", f"seed={seed}")
    assert out.returncode != 0 and time.time() - start < 180
    assert "no readable clip in shard(s)" in out.stderr, out.stderr[-3000:]


# ---------------------------------------------------------------------- many ranks: exit codes
def _launch(shards, run_dir, *extra, **kw):
    cmd = [PYTHON, "-m", "trainer.cli", "launch", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "pretrain", *tiny_overrides(shards, run_dir), *extra]
    return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.e2e
def test_launch_reports_a_config_error_once_with_exit_2(good_shards, tmp_path):
    proc = _launch(good_shards, tmp_path / "run", "optim.lrr=3")
    _, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.count("unknown key 'optim.lrr'") == 1, err[-3000:]


@pytest.mark.e2e
def test_launch_names_the_rank_whose_data_failed_with_exit_1(good_shards, tmp_path):
    shards = _spoiled(good_shards, tmp_path / "shards", "empty_shards")
    proc = _launch(shards, tmp_path / "run", "train.max_steps=3")
    _, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "rank 0: no readable clip" in err or "rank 1: no readable clip" in err
    assert "audioclr launch: error: rank" in err and "failed first" in err


@pytest.mark.e2e
def test_sigterm_to_launch_saves_on_every_rank_and_exits_143(good_shards, tmp_path):
    run = tmp_path / "run"
    proc = _launch(good_shards, run, "train.max_steps=100000", "train.ckpt_every=100000")
    deadline = time.time() + LIMIT
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(15)
    _, err = proc.communicate(timeout=LIMIT)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    (saved,) = (run / "checkpoints").iterdir()
    assert verify(saved) is None and (saved / "rank_00001.pt").is_file()


def _alive(pid: str) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.e2e
def test_loader_workers_die_with_a_killed_trainer(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(tiny_shards, run), "train.max_steps=100000",
           "data.num_workers=2"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + LIMIT
    children = []
    while len(children) < 2 or not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, "no step with two loader workers"
        time.sleep(0.1)  # the second worker may come late on a busy machine, or at an epoch's turn
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    proc.kill()
    proc.wait()
    deadline = time.time() + 2.5  # at once (the DataLoader's own parent check runs every 5 s, between batches)
    try:
        while any(_alive(c) for c in children):
            assert time.time() < deadline, "a loader worker outlived its trainer"
            time.sleep(0.1)
    finally:
        for c in children:
            if _alive(c):
                os.kill(int(c), 9)


@pytest.mark.e2e
def test_a_busy_worker_dies_with_its_parent_at_once(tmp_path):
    """The DataLoader notices a dead parent only between batches; a worker deep in one
    (a slow shard, a huge batch) is ended by the kernel as its parent dies."""
    pid_file = tmp_path / "child.pid"
    child = ("import os, sys; from dataio.backends.torch_pipeline import die_with_parent; "
             f"assert die_with_parent(); open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
             "sum(i * i for i in iter(int, 1))")  # busy forever
    spawn = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(600)"
    parent = subprocess.Popen([PYTHON, "-c", spawn], env=cli_env())
    deadline = time.time() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.time() < deadline
        time.sleep(0.05)
    busy = pid_file.read_text()
    parent.kill()
    parent.wait()
    deadline = time.time() + 5
    try:
        while _alive(busy):
            assert time.time() < deadline, "the busy child outlived its parent"
            time.sleep(0.05)
    finally:
        if _alive(busy):
            os.kill(int(busy), 9)  # a failed run leaves no busy orphan behind


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_short_clips_is_normal_not_a_warning(tmp_path, backend):
    make_shards(tmp_path / "notes", [3, 5, 9, 10], seconds=0.03)  # 30 ms notes, 0.5 s views
    write_dali_indexes(tmp_path / "notes")
    err = _plain_error(_pretrain(tmp_path / "notes", tmp_path / "run", "train.epochs=2", f"data.backend={backend}"), 0)
    assert "INFO audioclr.telemetry: epoch 1: 24 view(s) zero-padded" in err and "WARNING" not in err, err[-2000:]
