"""The signal fuzzer, data commands (issue 36, rows 2 and 6): ``shard``, ``shard convert``,
``demo-corpus`` and ``check-shards`` stopped by SIGINT (the whole group, as Ctrl-C) or
SIGTERM (the command) at seeded moments end with 130 or 143 and one line (no worker's
traceback), leave no ``.tmp`` behind (in their output or in ``TMPDIR``) nor a worker
running, keep the corpus they read, and the same command run again finishes. The tools,
and how to run many more moments: ``tests/stop_utils.py``; the training commands:
``tests/trainer/test_stops.py``."""

import subprocess

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import PYTHON, cli_env
from tests.stop_utils import check_kept, check_stop, moments, rerun, snapshot, stop_at, tmp_leftovers, tmpdir_env

pytestmark = pytest.mark.e2e

CLI = [PYTHON, "-m", "trainer.cli"]


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wavs")
    t = np.arange(16000) / 16000
    for i in range(240):
        (folder / f"c{i % 4}").mkdir(exist_ok=True)
        sf.write(folder / f"c{i % 4}" / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 7 * i) * t)).astype(np.float32),
                 16000)
    return folder


@pytest.fixture(scope="module")
def corpus(wavs, tmp_path_factory):
    """The wavs as a FLAC corpus (240 clips in 8 shards): what convert and check-shards read."""
    out = tmp_path_factory.mktemp("corpus") / "flac"
    subprocess.run([*CLI, "shard", str(wavs), "--out", str(out), "--workers", "2", "--shard-size", "30"],
                   env=cli_env(), check=True, capture_output=True, timeout=300)
    return out


def _env(tmp_path):
    return tmpdir_env(cli_env(), tmp_path / "tmpdir")


def _writer_command(command, wavs, corpus, out):
    return {"shard": [*CLI, "shard", str(wavs), "--out", str(out), "--shard-size", "30", "--workers", "2"],
            "convert": [*CLI, "shard", "convert", str(corpus), "--format", "logmel", "--out", str(out),
                        "--workers", "2"],
            "demo-corpus": [*CLI, "demo-corpus", "--out", str(out), "--clips", "120", "--workers", "2"]}[command]


WRITERS = ([("shard", m) for m in moments("shard", 1.0, 6.0, 1, 12)]
           + [("convert", m) for m in moments("convert", 1.0, 6.0, 1, 12)]
           + [("demo-corpus", m) for m in moments("demo-corpus", 0.5, 5.0, 1, 12)])


@pytest.mark.parametrize("command,moment", WRITERS, ids=[f"{c}-{m}" for c, m in WRITERS])
def test_a_stopped_corpus_writer_says_one_line_leaves_nothing_half_written_and_runs_again(wavs, corpus, tmp_path,
                                                                                        command, moment):
    out, env = tmp_path / "out", _env(tmp_path)
    before = snapshot(corpus)
    cmd = _writer_command(command, wavs, corpus, out)
    where = f"{command} stopped by {moment.sig.name} {moment.after:.1f} s in"
    run = stop_at(cmd, moment, env, where)
    finished = (out / "manifest.json").is_file()  # the stop may come after the last write, or not at all
    check_stop(run, moment, finished)
    left = tmp_leftovers(out, tmpdir=tmp_path / "tmpdir")
    assert not left, f"{where}: left {left}\n{run.stderr[-1500:]}"
    check_kept(before, corpus, where)
    again = rerun(cmd, env)
    if finished:
        assert again.returncode == 2 and "--overwrite" in again.stderr, where  # a whole corpus is not replaced
    else:
        assert again.returncode == 0, f"{where}: the rerun failed\n{again.stderr[-2000:]}"
    assert (out / "manifest.json").is_file(), where


@pytest.mark.parametrize("moment", moments("check-shards", 0.5, 6.0, 1, 12), ids=str)
def test_a_stopped_check_shards_says_one_line_and_runs_again(corpus, tmp_path, moment):
    env = _env(tmp_path)
    before = snapshot(corpus)
    cmd = [*CLI, "check-shards", str(corpus), "--workers", "2"]
    where = f"check-shards stopped by {moment.sig.name} {moment.after:.1f} s in"
    run = stop_at(cmd, moment, env, where)
    check_stop(run, moment, finished="shard(s) checked: 0 problem(s)" in run.stderr)
    left = tmp_leftovers(corpus, tmpdir=tmp_path / "tmpdir")
    assert not left, f"{where}: left {left}\n{run.stderr[-1500:]}"
    check_kept(before, corpus, where)
    again = rerun(cmd, env)
    assert again.returncode == 0 and "8 shard(s) checked: 0 problem(s)" in again.stderr, \
        f"{where}: the rerun\n{again.stderr[-2000:]}"
