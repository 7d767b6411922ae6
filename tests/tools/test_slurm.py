"""tools/slurm/pretrain.sbatch run as SLURM would run it on two nodes: `srun` and `scontrol`
are stand-ins that start one task per "node" on this machine (SLURM_NODEID 0 and 1) and
name 127.0.0.1 as the first node; everything after them is the real launch."""

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_env, tiny_overrides
from tests.dist_utils import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SRUN = """#!/usr/bin/env bash
# stand-in for srun: one task per node, here, with the variables SLURM gives each
while [[ "$1" == --* ]]; do shift; done
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf '127.0.0.1\\n127.0.0.2\\n'
"""


def _stand_ins(folder: Path) -> None:
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("engine,restarts", [("ddp", 0), pytest.param("deepspeed", 0, marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is None, reason="needs deepspeed")), ("ddp", 1)],
    ids=["ddp", "deepspeed", "elastic"])
def test_the_sbatch_script_trains_across_two_nodes(tiny_shards, tmp_path, engine, restarts):
    """Static rendezvous, or with MAX_RESTARTS the c10d rendezvous elastic restarts need."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_ins(bin_dir)
    run = tmp_path / "run"
    env = dict(cli_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(REPO), GPUS="1", MASTER_PORT=str(free_port()), ENGINE=engine,
               MAX_RESTARTS=str(restarts), SLURM_JOB_ID="4242")
    out = subprocess.run(["bash", str(REPO / "tools" / "slurm" / "pretrain.sbatch"), "configs/demo.yaml",
                          *tiny_overrides(tiny_shards, run), "train.max_steps=2"],
                         env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    kind = "c10d, up to 1 restarts" if restarts else "static"
    assert f"2 node(s) x 1 rank(s), rendezvous 127.0.0.1:{env['MASTER_PORT']} ({kind}), engine {engine}" in out.stdout
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == engine
