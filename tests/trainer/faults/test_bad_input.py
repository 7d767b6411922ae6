"""Bad input ends with a message that names the problem, and keeps what was written."""

import subprocess

import pytest
import torch

from tests.conftest import PYTHON, checkpoint_weights, cli_env, tiny_overrides

pytestmark = pytest.mark.e2e


def test_non_finite_loss_stops_with_a_message_and_keeps_checkpoints(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(tiny_shards, run_dir),
                          "optim.lr=1e30", "train.max_steps=20", "train.ckpt_every=1"],
                         env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 1
    assert "loss is not finite at step" in out.stderr and "Traceback" not in out.stderr
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert saved and all(not p.name.endswith(".tmp") for p in saved)
    weights = checkpoint_weights(saved[-1])
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_eval_of_a_run_without_encoder_names_the_problem(tiny_shards, tmp_path):
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "eval", "--run", str(tmp_path), "--data", str(tiny_shards)],
                         env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "holds no exported encoder" in out.stderr


def test_unknown_command_suggests_the_nearest(tmp_path):
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "pretrian"], env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'pretrain'" in out.stderr
