"""Speed settings change how a step runs, not what it computes: torch.compile of the
encoder (tried before the first step, falling back or refusing by its setting), cuDNN's
algorithm search, the loader's prefetch depth and worker threads."""

import logging
import subprocess

import pytest
import torch
from torch.utils.data import DataLoader

from dataio.errors import ConfigError
from tests.conftest import PYTHON, cli_env, tiny_overrides
from trainer.models.encoders import build_encoder
from trainer.models.heads import ContrastiveModel, ProjectionHead
from trainer.speed import compile_encoder, wants_compile
from trainer.train.config import PretrainConfig, load_config

CPU = torch.device("cpu")


def _model() -> ContrastiveModel:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=1, width=4)
    return ContrastiveModel(encoder, ProjectionHead(encoder.embedding_dim, 16, 8))


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.e2e
def test_the_compiled_encoder_computes_what_the_eager_one_does_and_the_trial_leaves_no_trace():
    model = _model()
    before = _state(model)
    done = compile_encoder(model, "on", CPU, torch.zeros(4, 2, 1, 32, 51), None)
    assert done.startswith("compiled")
    assert model.encoder._compiled_call_impl is not None
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the trial changed weights or BN statistics"
    assert all(p.grad is None for p in model.parameters()), "the trial left gradients behind"
    assert list(after) == list(before), "parameter names are those of the eager model (checkpoints, exports)"
    x = torch.randn(4, 2, 1, 32, 51)
    compiled = model(x)["z"]
    compiled.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    eager = _model()
    eager.load_state_dict(before)
    reference = eager(x)["z"]
    reference.sum().backward()
    assert torch.allclose(compiled, reference, atol=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-4) for g, p in zip(grads, eager.parameters()))


def _failing_compile(module):
    """Stands in for a compiler that fails on the first call (as inductor does when its C++
    toolchain is missing)."""
    def fail(*args, **kwargs):
        raise RuntimeError("backend compiler failed: no C++ compiler found\nmore detail")

    def compile_(*args, **kwargs):
        module._compiled_call_impl = fail
    return compile_


def test_a_failing_compile_falls_back_under_auto_and_is_refused_under_on(caplog):
    cuda = torch.device("cuda")  # auto compiles on a GPU only; the model itself stays on the CPU
    model = _model()
    before = _state(model)
    model.encoder.compile = _failing_compile(model.encoder)
    with caplog.at_level(logging.WARNING, logger="audioclr.speed"):
        done = compile_encoder(model, "auto", cuda, torch.zeros(4, 2, 1, 32, 51), None)
    assert done.startswith("eager (compile failed: RuntimeError: backend compiler failed")
    assert "train.compile=auto: torch.compile failed" in caplog.text
    assert model.encoder._compiled_call_impl is None, "back to the eager forward"
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert model(torch.randn(2, 2, 1, 32, 51))["z"].shape == (2, 2, 8)
    with pytest.raises(ConfigError, match=r"train.compile: torch.compile of the ResNet\w* encoder failed "
                                          r"\(RuntimeError: backend compiler failed: no C\+\+ compiler found\); "
                                          r"set train.compile=off"):
        compile_encoder(model, "on", CPU, torch.zeros(4, 2, 1, 32, 51), None)


def test_compile_auto_is_for_gpus_and_off_is_off():
    assert not wants_compile("auto", CPU) and wants_compile("auto", torch.device("cuda"))
    assert wants_compile("on", CPU) and not wants_compile("off", torch.device("cuda"))
    model = _model()
    assert compile_encoder(model, "auto", CPU, torch.zeros(1), None) == "off"
    assert model.encoder._compiled_call_impl is None


@pytest.mark.e2e
def test_compile_on_under_zero_3_is_refused_before_any_work(tiny_shards, tmp_path):
    pytest.importorskip("deepspeed")
    out = subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(tiny_shards, tmp_path / "run"),
                          "train.max_steps=1", "train.engine=deepspeed", "deepspeed.zero_stage=3",
                          "train.compile=on"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.compile: on is not supported with deepspeed.zero_stage=3" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override,words", [
    ("train.compile=sometimes", "train.compile"), ("data.prefetch=0", "data.prefetch"),
    ("data.worker_threads=0", "data.worker_threads"), ("train.cudnn_benchmark=maybe", "train.cudnn_benchmark")])
def test_bad_speed_settings_name_the_key(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(PretrainConfig, None, [f"run_dir={tmp_path}", override])


def test_compile_on_and_off_survive_yaml_reading_them_as_booleans(tmp_path):
    need = ["data.backend=synthetic"]
    for word in ("on", "off", "auto"):
        assert load_config(PretrainConfig, None, [*need, f"train.compile={word}"]).train.compile == word
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  compile: on\n")
    assert load_config(PretrainConfig, str(recipe), need).train.compile == "on"


def test_loader_workers_get_the_threads_and_prefetch_asked_for(tiny_shards, tmp_path):
    from dataio.augment import build_augmenter
    from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
    from dataio.backends.torch_pipeline import wave_loader
    from dataio.frontend import FrontendConfig
    from dataio.reading.manifest import load_manifest

    manifest = load_manifest(str(tiny_shards))
    cfg = DataConfig(shards=str(tiny_shards), batch_size=4, num_workers=1, prefetch=3, worker_threads=2)
    aug = build_augmenter(None, FrontendConfig(), cfg.view_seconds, num_views=2, pairs_per_clip=1, seed=0)
    place = Placement(rank=0, world_size=1, seed=0, steps=steps_per_epoch(cfg, manifest, 1))
    loader = wave_loader(cfg, manifest, aug, place, epoch=0, start_step=0, in_workers=False)
    assert loader.prefetch_factor == 3
    # the loader's own worker set-up, run in a real worker process
    threads = DataLoader(_Threads(), batch_size=None, num_workers=1, worker_init_fn=loader.worker_init_fn)
    assert list(threads) == [2]


class _Threads(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.get_num_threads()


WORKERS_AFTER_PARALLEL_WORK = """
import sys, torch
from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest
from dataio.backends.torch_pipeline import wave_loader
from tests.conftest import demo_chain
torch.set_num_threads(2)
x = torch.randn(1000, 1000)
(x @ x).sum()  # the parent's OpenMP team exists before the workers are made
manifest = load_manifest(sys.argv[1])
cfg = DataConfig(shards=sys.argv[1], batch_size=4, num_workers=1, worker_threads=2, view_seconds=0.5)
aug = build_augmenter(demo_chain(), FrontendConfig(n_mels=32), 0.5, num_views=2, pairs_per_clip=1, seed=0)
place = Placement(rank=0, world_size=1, seed=0, steps=steps_per_epoch(cfg, manifest, 1))
batch = next(iter(wave_loader(cfg, manifest, aug, place, epoch=0, start_step=0, in_workers=True)))
print("views", tuple(batch.payload.shape))
"""


@pytest.mark.e2e
def test_workers_with_several_threads_do_not_hang_after_the_parent_computed(tiny_shards):
    """A forked worker's first multi-threaded op waits forever on the parent's OpenMP team
    (it is not copied by fork): workers with more than one thread are spawned fresh."""
    out = subprocess.run([PYTHON, "-c", WORKERS_AFTER_PARALLEL_WORK, str(tiny_shards)], env=cli_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "views (4, 2, 1, 32, 51)" in out.stdout, out.stderr[-3000:]
