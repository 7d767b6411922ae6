"""Real launches: torchrun with two processes, and two torchrun agents as two nodes."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml

from tests.conftest import PYTHON, cli_env, tiny_overrides
from tests.dist_utils import alive, children, free_port, kill_launch
from tests.shard_utils import make_shards

pytestmark = pytest.mark.e2e

STEPS = 6  # more than one epoch: 27 clips // (2 ranks x 4) = 3 steps per epoch


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Ranks get 3 + 9 or 5 + 10 clips: the rank with fewer must not leave the other hanging."""
    folder = tmp_path_factory.mktemp("uneven")
    make_shards(folder, [3, 5, 9, 10], seconds=0.8)
    return folder


def _train_args(shards, run_dir):
    return ["-m", "trainer.cli.pretrain", *tiny_overrides(shards, run_dir), f"train.max_steps={STEPS}"]


def _check_run(run_dir):
    (ckpt,) = (run_dir / "checkpoints").iterdir()
    assert ckpt.name == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.iterdir()) == ["engine", "meta.json", "rank_00000.pt", "rank_00001.pt",
                                                     "state.pt"]
    assert sorted(p.name for p in (ckpt / "engine").iterdir()) == ["optimizer.pt", "weights.safetensors"]
    assert (run_dir / "encoder.safetensors").is_file() and (run_dir / "encoder.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS
    assert all(r["allreduce_seconds"] > 0 and r["rank_skew"] >= 1.0 for r in records), "two ranks' telemetry"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == STEPS and resolved["data"]["batch_size"] == 4


def _torchrun():
    exe = shutil.which("torchrun")
    return [exe] if exe else [PYTHON, "-m", "torch.distributed.run"]


@pytest.mark.parametrize("extra", [["data.backend=torch"], pytest.param(["data.backend=dali"], marks=pytest.mark.skipif(
    importlib.util.find_spec("nvidia.dali") is None, reason="needs nvidia-dali")),
    ["objective.name=moco", "objective.queue_size=32", "train.grad_cache_chunk=0"],
    ["train.grad_cache_chunk=2"], ["data.resampled=true", "data.num_workers=3"]],
    ids=["torch", "dali", "moco", "gradcache", "resampled"])
def test_torchrun_two_processes(uneven_shards, tmp_path, extra):
    run_dir = tmp_path / "run"
    out = subprocess.run([*_torchrun(), "--nproc-per-node=2", "--master-addr=127.0.0.1",
                          f"--master-port={free_port()}", *_train_args(uneven_shards, run_dir), *extra],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _check_run(run_dir)


def test_ranks_save_and_stop_when_their_launcher_is_killed(uneven_shards, tmp_path):
    """torchrun gives every rank a session of its own: a launcher killed with -9 (by hand, by
    an out-of-memory killer) would leave them training on, unseen, beside the rerun that
    resumes the run. Each rank hears of its launcher's death as a SIGTERM: a checkpoint,
    then exit."""
    run_dir = tmp_path / "run"
    cmd = [*_torchrun(), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "trainer.cli.pretrain", *tiny_overrides(uneven_shards, run_dir), "train.max_steps=100000",
           "train.ckpt_every=100000"]
    launcher = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").is_file() or len(children(launcher.pid)) < 2:
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.time() < deadline, "no training step within 240 s"
        time.sleep(0.05)
    ranks = children(launcher.pid)
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: its ranks are in sessions of their own
    launcher.wait(timeout=60)
    deadline = time.time() + 120
    try:
        while any(alive(pid) for pid in ranks):
            assert time.time() < deadline, "the ranks outlived their launcher by 120 s"
            time.sleep(0.05)
    finally:
        for pid in filter(alive, ranks):  # no orphan outlives a failed test
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    err = launcher.stderr.read()
    assert "SIGTERM received" in err and "checkpoint saved" in err, err[-3000:]
    (saved,) = (run_dir / "checkpoints").iterdir()
    assert 0 < int(saved.name.split("_")[1]) < 100000


def test_two_nodes_on_loopback(uneven_shards, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    agents = [subprocess.Popen([*_torchrun(), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={n}",
                                "--master-addr=127.0.0.1", f"--master-port={port}",
                                *_train_args(uneven_shards, run_dir)],
                               env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for n in range(2)]
    for agent in agents:
        output, _ = agent.communicate(timeout=300)
        assert agent.returncode == 0, output[-3000:]
    _check_run(run_dir)


ELASTIC_STEPS, ELASTIC_EVERY = 12, 3


def _elastic_cmd(shards, run_dir, *flags, launcher=None):
    launch = launcher or [*_torchrun(), "--nnodes=1", "--nproc-per-node=2", *flags, "-m", "trainer.cli.pretrain"]
    return [*launch, *tiny_overrides(shards, run_dir), f"train.max_steps={ELASTIC_STEPS}",
            f"train.ckpt_every={ELASTIC_EVERY}"]


@pytest.fixture(scope="module")
def unbroken_run(uneven_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("elastic") / "whole"
    cmd = _elastic_cmd(uneven_shards, run_dir, "--master-addr=127.0.0.1", f"--master-port={free_port()}")
    out = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("rendezvous", ["c10d", "static", "audioclr-launch"])
def test_elastic_restart_after_a_lost_worker_ends_with_the_weights_of_an_unbroken_run(
        uneven_shards, unbroken_run, tmp_path, rendezvous):
    """torchrun --max-restarts: one worker killed with -9 mid-run, the agent restarts the
    group, the ranks resume from the last checkpoint, and the run ends with the weights of
    a run never interrupted. With the agent's store shared across attempts (c10d's default,
    and static), the new ranks could read the dead ones' addresses: without keys of their
    own per attempt this failed to connect or hung, about one restart in two."""
    port = free_port()
    if rendezvous == "static":
        flags = ["--max-restarts=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    else:
        flags = ["--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t"]
    # audioclr launch (what the shipped scripts run) gives each attempt a new store instead
    launcher = ([PYTHON, "-m", "trainer.cli.launch", "--nnodes=1", "--nproc-per-node=2", *flags, "pretrain"]
                if rendezvous == "audioclr-launch" else None)
    broken = tmp_path / "broken"
    agent = subprocess.Popen(_elastic_cmd(uneven_shards, broken, *flags, launcher=launcher), env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = broken / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= ELASTIC_EVERY + 2):
        assert agent.poll() is None, agent.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint and two more steps within 240 s"
        time.sleep(0.05)
    victim = children(agent.pid)[-1]
    os.killpg(os.getpgid(victim), signal.SIGKILL)  # the worker and its loader processes, as a crash would
    try:
        output, _ = agent.communicate(timeout=240)
    finally:
        if agent.poll() is None:
            kill_launch(agent.pid)
    assert agent.returncode == 0, output[-4000:]
    assert "lost contact with another rank" in output and "resumed from" in output, output[-4000:]
    from safetensors.torch import load_file

    a, b = load_file(str(unbroken_run / "encoder.safetensors")), load_file(str(broken / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, ELASTIC_STEPS + 1)), "metrics.jsonl is cut back to the checkpoint on resume"
