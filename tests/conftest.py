import os
import sys
from pathlib import Path

import pytest

from tests.shard_utils import make_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """real_audio tests run only when asked for by name: a ``-m`` given on the command line
    (``-m "not e2e"``, ``-m e2e``) replaces setup.cfg's ``-m "not real_audio"``. Under
    pytest-xdist (``--dist loadgroup``, setup.cfg) the tests of a module that share a
    module-scoped fixture go to one worker, which builds it once: split between two, each
    would build its own (a corpus, a pretrained run, a DeepSpeed launch)."""
    for item in items:
        defs = item._fixtureinfo.name2fixturedefs.values()
        if any(d[-1].scope == "module" for d in defs) and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if "real_audio" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("real_audio") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def demo_chain() -> dict:
    """The augmentation chain of configs/demo.yaml."""
    import yaml

    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["augment"]


def tiny_overrides(shards: Path, run_dir: Path, augment: dict | None = None) -> list[str]:
    """A pretraining small enough for a unit test: width-4 ResNet-18, 0.5 s views, the
    demo's augmentation chain (or ``augment``)."""
    import json

    chain = demo_chain() if augment is None else augment
    return [f"data.shards={shards}", f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=1",
            "data.view_seconds=0.5", "frontend.n_mels=32", "model.width=4", "model.proj_hidden=16",
            "model.proj_dim=8", "optim.lr=0.05", "train.log_every=1", "train.progress=false",
            "train.tensorboard=false", f"augment={json.dumps(chain)}"]


def checkpoint_weights(folder: Path) -> dict:
    """The whole model a checkpoint folder holds (``engine/weights.safetensors``)."""
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "engine" / "weights.safetensors"))


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_shards")
    make_shards(folder, [6, 6, 6, 6], seconds=0.8)
    return folder


def export_random_encoder(run_dir: Path, width: int = 8, seed: int = 0, view_seconds: float = 0.5):
    """A random-init ResNet-18 (32 mel bands) exported into ``run_dir`` as a finished run
    would; returns the encoder (eval mode)."""
    import torch

    from dataio.frontend import FrontendConfig
    from trainer.models.encoders import build_encoder
    from trainer.models.export import encoder_meta, export_encoder

    torch.manual_seed(seed)
    encoder = build_encoder("resnet18", width=width).eval()
    meta = encoder_meta("resnet18", width, FrontendConfig(n_mels=32), encoder.embedding_dim, 1, view_seconds)
    export_encoder(encoder, meta, run_dir)
    return encoder


def labelled_run(root: Path, width: int = 8) -> Path:
    """``root`` holding labelled shards (24 tone clips of three classes in two folds, in
    ``root/shards``) and a random-init encoder exported as a finished run."""
    make_shards(root / "shards", [12, 12], seconds=1.0)
    export_random_encoder(root, width=width)
    return root


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> Path:
    """A small exported encoder (width 4) beside labelled shards: what sweeps evaluate."""
    return labelled_run(tmp_path_factory.mktemp("sweep"), width=4)


def cli_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable
