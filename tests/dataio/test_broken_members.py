"""A member that does not decode: skipped and counted (torch), a clear stop (DALI), found by check-shards."""

import importlib.util
import subprocess

import pytest

from tests.conftest import PYTHON, cli_env, tiny_overrides
from tests.shard_utils import corrupt_member, make_shards, write_dali_indexes

pytestmark = pytest.mark.e2e


@pytest.fixture
def broken(tmp_path):
    folder = tmp_path / "shards"
    make_shards(folder, [6, 6, 6, 6], seconds=0.8)
    write_dali_indexes(folder)
    key = corrupt_member(folder / "shard-00001.tar")
    return folder, key


def test_check_shards_names_the_broken_member(broken):
    folder, key = broken
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "check-shards", str(folder), "--workers", "1"],
                         env=cli_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert f"shard-00001.tar\t{key}\t" in out.stdout and "1 problem(s)" in out.stderr


def test_torch_backend_skips_and_counts(broken, tmp_path):
    folder, _ = broken
    run = tmp_path / "run"
    out = subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(folder, run), "train.max_steps=12"],
                         env=cli_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "clip(s) skipped" in out.stderr
    assert (run / "encoder.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")
def test_dali_backend_stops_with_a_message(broken, tmp_path):
    folder, _ = broken
    out = subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(folder, tmp_path / "run"),
                          "data.backend=dali", "train.max_steps=12"],
                         env=cli_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 1
    assert "audioclr check-shards" in out.stderr and "Traceback" not in out.stderr


def test_a_stop_arriving_inside_the_decoder_is_the_stop_not_a_broken_member(monkeypatch):
    """Issue 36, row 7: soundfile decodes through cffi callbacks, and a SIGTERM handled inside
    one is lost there, so the decoder fails on a good clip, which was then reported broken
    (skipped, rejected, a check-shards finding). The stop must come out instead."""
    import io
    import os
    import signal

    import numpy as np

    import dataio.formats.flac as flac
    from dataio.formats.clip import to_pcm16
    from dataio.formats.codec import ClipCodec
    from trainer.commands import sigterm_stops, stop_handled

    data = flac.Flac().encode(to_pcm16(np.sin(np.arange(8000) / 9.0).astype(np.float32) * 0.3), 16000)
    codec = ClipCodec("flac", 16000)
    assert codec.problem(data) is None

    class StoppedWhileRead(io.BytesIO):
        def readinto(self, buffer):
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: inside the callback
            return super().readinto(buffer)

    monkeypatch.setattr(flac.io, "BytesIO", StoppedWhileRead)
    try:
        with sigterm_stops(), pytest.raises(KeyboardInterrupt):
            codec.problem(data)
    finally:
        stop_handled()
