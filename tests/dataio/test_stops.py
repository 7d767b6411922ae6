"""Stopping the data commands as a person does (issue 36, rows 2 and 6; the start of the
signal fuzzer): Ctrl-C in a terminal reaches the whole process group, workers included;
SIGTERM reaches the command. At seeded random moments, ``shard`` and ``shard convert``
must end with 130 or 143 and one line (no worker's traceback), leave no ``.tmp`` behind,
and the same command run again must finish. A few moments in the default run;
``AUDIOCLR_FUZZ=long`` (and ``AUDIOCLR_FUZZ_SEED=N``) tries many more."""

import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import PYTHON, cli_env

pytestmark = pytest.mark.e2e

LONG = os.environ.get("AUDIOCLR_FUZZ") == "long"
SEED = int(os.environ.get("AUDIOCLR_FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wavs")
    t = np.arange(16000) / 16000
    for i in range(240):
        (folder / f"c{i % 4}").mkdir(exist_ok=True)
        sf.write(folder / f"c{i % 4}" / f"{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 7 * i) * t)).astype(np.float32),
                 16000)
    return folder


def _stop_at(cmd: list[str], after: float, sig: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own; ``after`` seconds in, send ``sig``: SIGINT to
    the whole group (a terminal's Ctrl-C), SIGTERM to the command alone (a scheduler)."""
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    time.sleep(after)
    if proc.poll() is None:
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _moments() -> list[tuple[float, int]]:
    rng = random.Random(SEED)
    count = 12 if LONG else 2
    return [(rng.uniform(1.0, 6.0), rng.choice([signal.SIGINT, signal.SIGTERM])) for _ in range(count)]


@pytest.mark.parametrize("command", ["shard", "convert"])
def test_a_stopped_data_command_says_one_line_leaves_nothing_half_written_and_runs_again(wavs, tmp_path, command):
    source = tmp_path / "source"
    subprocess.run([PYTHON, "-m", "trainer.cli", "shard", str(wavs), "--out", str(source), "--workers", "2",
                    "--shard-size", "30"], env=cli_env(), check=True, capture_output=True, timeout=300)
    for k, (after, sig) in enumerate(_moments()):
        out = tmp_path / f"out{k}"
        cmd = ([PYTHON, "-m", "trainer.cli", "shard", str(wavs), "--out", str(out), "--shard-size", "30"]
               if command == "shard" else
               [PYTHON, "-m", "trainer.cli", "shard", "convert", str(source), "--format", "logmel", "--out", str(out)])
        cmd += ["--workers", "2"]
        stopped = _stop_at(cmd, after, sig)
        where = f"{command} stopped by {signal.Signals(sig).name} {after:.1f} s in"
        finished = (out / "manifest.json").is_file()  # the stop may come after the last write, or not at all
        if stopped.returncode == 128 + sig:
            assert "Traceback" not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr, \
                f"{where}:\n{stopped.stderr[-3000:]}"
            assert [ln for ln in stopped.stderr.splitlines() if ln.startswith("audioclr")] == \
                [stopped.stderr.strip().splitlines()[-1]], f"{where}: one line\n{stopped.stderr[-2000:]}"
        elif stopped.returncode == -sig:  # the default action: only once the command's work is done
            assert finished, f"{where}: killed mid-work without a word\n{stopped.stderr[-2000:]}"
        else:
            assert stopped.returncode == 0, f"{where}: rc {stopped.returncode}\n{stopped.stderr[-2000:]}"
        left = [p.relative_to(out) for p in out.rglob("*") if p.name.endswith(".tmp")] if out.exists() else []
        assert not left, f"{where}: left {left}\n{stopped.stderr[-1500:]}"
        again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
        if finished:
            assert again.returncode == 2 and "--overwrite" in again.stderr, where  # a whole corpus is not replaced
        else:
            assert again.returncode == 0, f"{where}: the rerun failed\n{again.stderr[-2000:]}"
        assert (out / "manifest.json").is_file(), where
    assert (source / "manifest.json").is_file()
