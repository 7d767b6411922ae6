"""Typed config: YAML + dotted overrides; mistakes stop the program with exit 2, naming the key."""

import subprocess

import pytest

from dataio.errors import ConfigError
from dataio.recipes import parse_overrides
from tests.conftest import PYTHON, REPO, cli_env
from trainer.train.config import PretrainConfig, load_config, save_config

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_overrides_parse_as_yaml_values():
    assert parse_overrides(["optim.lr=0.5", "train.resume=auto", "data.num_views=3", "x.y=true"]) == {
        "optim": {"lr": 0.5}, "train": {"resume": "auto"}, "data": {"num_views": 3}, "x": {"y": True}}


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  shards: /s\noptim:\n  weight_decay: 1e-6\n")
    cfg = load_config(PretrainConfig, path, ["optim.lr=3e-4"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3e-4, 1e-6)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  shards: /s\n  batch_size: 8\noptim:\n  lr: 0.2\n")
    cfg = load_config(PretrainConfig, path, ["optim.lr=0.3", "optim.warmup_steps=5"])
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.warmup_steps) == (8, 0.3, 5)
    assert cfg.optim.momentum == 0.9  # default kept
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(PretrainConfig, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr' (did you mean optim.lr?)"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("optim.name=adam", "optim.name: 'adam' is not one of sgd, lars, adamw (did you mean 'adamw'?)"),
    ("data.batch_size=0.5", "data.batch_size: expected int"),
    ("train.epochs=0", "train.epochs: must be positive"),
    ("model.encoder=resnet81", "did you mean 'resnet18'"),
    ("objective.name=looc", "data.num_views: objective looc needs 3 or more views"),
])
def test_mistakes_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, ["data.shards=/s", override])
    assert expected in str(err.value)


@pytest.mark.e2e
@pytest.mark.parametrize("override, key", [("optim.lrr=0.1", "optim.lrr"), ("optim.lr=abc", "optim.lr"),
                                           ("train.precision=fp8", "train.precision")])
def test_cli_exits_2_before_any_work(tmp_path, override, key):
    run_dir = tmp_path / "run"
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "pretrain", "--config", str(REPO / "configs/demo.yaml"),
                          f"run_dir={run_dir}", override], env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 2
    assert key in out.stderr and "Traceback" not in out.stderr
    assert not run_dir.exists()


@pytest.mark.e2e
def test_missing_shards_exit_2_with_a_message(tmp_path):
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "pretrain", f"data.shards={tmp_path / 'nope'}",
                          f"run_dir={tmp_path / 'run'}"], env=cli_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "no shard manifest" in out.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "audioclr" in first
    if path.parent.name == "sweeps":  # Ray Tune sweeps over saved encoders
        from trainer.tune.sweep import SweepConfig

        assert "audioclr tune" in first
        load_config(SweepConfig, path)
    else:
        load_config(PretrainConfig, path)


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


def test_fast_precision_is_bf16_only_where_the_hardware_computes_it():
    import torch

    from trainer.parallel.device import autocast_dtype, cpu_computes_bf16

    cpu = torch.device("cpu")
    assert autocast_dtype("fast", cpu) == (torch.bfloat16 if cpu_computes_bf16() else None)
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fast", torch.device("cuda")) == torch.bfloat16
