import os
import sys
from pathlib import Path

import pytest

from tests.shard_utils import make_shards

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(shards: Path, run_dir: Path) -> list[str]:
    """A pretraining small enough for a unit test: width-4 ResNet-18, 0.5 s views."""
    return [f"data.shards={shards}", f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=1",
            "data.view_seconds=0.5", "frontend.n_mels=32", "model.width=4", "model.proj_hidden=16",
            "model.proj_dim=8", "optim.lr=0.05", "train.log_every=1", "train.progress=false",
            "train.tensorboard=false"]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_shards")
    make_shards(folder, [6, 6, 6, 6], seconds=0.8)
    return folder


def cli_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable
