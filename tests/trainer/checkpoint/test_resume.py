"""A run killed with SIGKILL (or stopped by SIGTERM) and resumed ends where an
uninterrupted run ends: same weights, same optimizer state."""

import importlib.util
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, checkpoint_weights, cli_env, tiny_overrides
from trainer.train.checkpoint import load_tensors

pytestmark = pytest.mark.e2e

TOTAL = 30
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")


def _cmd(shards, run_dir, *extra):
    return [PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(shards, run_dir),
            f"train.max_steps={TOTAL}", *extra]


def _final_state(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints" / f"step_{TOTAL:08d}"
    return {"model": checkpoint_weights(folder), **load_tensors(folder / "engine" / "optimizer.pt")}


def _assert_same(a: dict, b: dict) -> None:
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(mom_a) > 10 and all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))


def _run_until(cmd, marker: Path, sig: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


@pytest.mark.parametrize("backend", ["torch", "resampled", pytest.param("dali", marks=needs_dali)])
def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(tiny_shards, tmp_path, backend):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    use = ["data.backend=torch", "data.resampled=true"] if backend == "resampled" else [f"data.backend={backend}"]
    if backend != "dali":  # 3 workers take turns across the epochs' ends unevenly (6 steps per epoch)
        use.append("data.num_workers=3")
    subprocess.run(_cmd(tiny_shards, ref, *use), env=cli_env(), check=True, capture_output=True)
    # the reference keeps its loader workers for the whole run; the killed run starts fresh
    # ones every epoch: the batches are the same
    use.append("data.persistent_workers=false")
    # step 7 is mid-epoch (6 steps per epoch): the data position must be restored too
    _run_until(_cmd(tiny_shards, killed, "train.ckpt_every=7", *use),
               killed / "checkpoints" / "step_00000007", signal.SIGKILL)
    done = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert f"step_{TOTAL:08d}" not in done, "the run finished before it was killed"
    out = subprocess.run(_cmd(tiny_shards, killed, "train.ckpt_every=7", *use), env=cli_env(),
                         check=True, capture_output=True, text=True)
    assert "resumed from" in out.stderr
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert kept == ["step_00000021", "step_00000028", f"step_{TOTAL:08d}"], "the last 3 are kept"
    _assert_same(_final_state(ref), _final_state(killed))
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL + 1)), "metrics read as one run"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_128_plus_signal(tiny_shards, tmp_path, sig):
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(tiny_shards, ref), env=cli_env(), check=True, capture_output=True)
    proc = _run_until(_cmd(tiny_shards, run, "train.ckpt_every=1000"), run / "metrics.jsonl", sig)
    err = proc.stderr.read().decode()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name}" in err
    (saved,) = (run / "checkpoints").iterdir()
    assert 0 < int(saved.name.split("_")[1]) < TOTAL
    subprocess.run(_cmd(tiny_shards, run), env=cli_env(), check=True, capture_output=True)
    _assert_same(_final_state(ref), _final_state(run))
