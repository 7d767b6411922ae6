"""The DeepSpeed engine: ZeRO 0-3 train exactly what DDP and one process train, resume
bitwise, save without code, and refuse bad settings with exit 2."""

import json
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import PYTHON, REPO, checkpoint_weights, cli_env, tiny_overrides
from tests.dist_utils import alive, free_port, kill_launch, run_workers

pytest.importorskip("deepspeed")

B, STEPS = 4, 3
EXTRA = {"moco": {"queue_size": 16, "momentum": 0.9}, "npid": {"nce_noise": 5}, "cola": {"cola_dim": 8}}


def _batches(rank: int, world: int) -> list:
    """Fixed global batches of 2B clips; this rank's slice of each."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        views = torch.randn(2 * B, 2, 1, 16, 24, generator=g)
        labels, indices = torch.randint(0, 3, (2 * B,), generator=g), torch.randperm(2 * B, generator=g)
        part = slice(rank * (2 * B // world), (rank + 1) * (2 * B // world))
        out.append(SimpleNamespace(views=views[part], labels=labels[part], indices=indices[part]))
    return out


def _train(rank: int, world: int, name: str, engine_name: str, stage: int, chunk: int) -> dict:
    """STEPS optimisation steps of ``name`` (fp32) as the trainer takes them; the final
    weights of the whole model, gathered."""
    from trainer.models.encoders import build_encoder
    from trainer.objectives import ObjectiveContext, build_objective
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.parallel.engines import build_engine
    from trainer.parallel.gradcache import GradCache
    from trainer.parallel.sync_bn import convert_global_bn
    from trainer.train.config import DeepSpeedConfig, ModelConfig, ObjectiveConfig

    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name=name, temperature=0.2, **EXTRA.get(name, {})),
                          ModelConfig(proj_hidden=16, proj_dim=8),
                          ObjectiveContext(rank=rank, world_size=world, num_classes=3, num_clips=2 * B,
                                           total_steps=STEPS))
    model = obj.build_model(build_encoder("resnet18", in_channels=1, width=4))
    if not chunk:  # batch norm sees chunk statistics under gradient caching: compared with itself
        model = convert_global_bn(model)
    obj.attach(model)
    opt = build_optimizer("sgd", model, 0.1, 0.9, 1e-4, 0.001)
    sched = build_scheduler(opt, 1, STEPS)
    engine = build_engine(engine_name, model, opt, sched, torch.device("cpu"), None, 1.0,
                          settings=DeepSpeedConfig(zero_stage=stage), batch_size=2 * B // world)
    for step, batch in enumerate(_batches(rank, world)):
        engine.train()
        views = obj.model_views(batch.views)
        if chunk:
            cache = GradCache(engine.forward, views, chunk, engine.accumulating)
            obj.loss_backward(cache.outputs(), batch, chunk)
            cache.backward(backward=engine.backward)
        else:
            engine.backward(obj.loss(engine.forward(views), batch))
        engine.step()
        with engine.gathered() as full:
            obj.after_step(full, step)
    with engine.gathered() as full:
        return {k: v.detach().clone() for k, v in full.state_dict().items()}


def _all_engines(rank: int, world: int, name: str, chunk: int = 0) -> dict:
    runs = {("ddp", 0): _train(rank, world, name, "ddp", 0, chunk)}
    for stage in (0, 1, 2, 3) if not chunk else (2, 3):
        runs[("deepspeed", stage)] = _train(rank, world, name, "deepspeed", stage, chunk)
    return runs


def _close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if value.is_floating_point():
            worst = float((got[key] - value).abs().max()) if value.numel() else 0.0
            assert worst < 1e-5, f"{what}: {key} differs by {worst:.2e}"
        else:
            assert torch.equal(got[key], value), f"{what}: {key}"


OBJECTIVES = ["simclr", "moco", "npid", "cola", "hybrid"]
CACHED = ["simclr", "cola"]  # gradient caching: one objective without parameters of its own, one with


def _every_run(rank: int, world: int) -> dict:
    """Every objective under DDP and ZeRO 0-3, and on several ranks gradient caching under
    ZeRO 2 and 3, in one launch (a launch's start, DeepSpeed's import among it, costs more than an
    objective's steps)."""
    runs = {name: _all_engines(rank, world, name) for name in OBJECTIVES}
    if world > 1:  # one process's gradient caching: tests/trainer/parallel/test_gradcache.py
        runs.update({(name, "cached"): _all_engines(rank, world, name, 2) for name in CACHED})
    return runs


@pytest.fixture(scope="module")
def engine_runs() -> dict:
    """``_every_run`` in one process and on two ranks: {1: [rank 0], 2: [rank 0, rank 1]}."""
    return {world: run_workers(_every_run, world, timeout=900) for world in (1, 2)}


@pytest.mark.e2e
@pytest.mark.parametrize("name", OBJECTIVES)
def test_zero_0_to_3_on_two_ranks_equal_ddp_and_one_process(engine_runs, name):
    (one,), two = engine_runs[1], engine_runs[2]
    reference = one[name][("ddp", 0)]
    moved = max(float((v - _initial(name)[k]).abs().max()) for k, v in reference.items() if v.is_floating_point())
    assert moved > 1e-3, "the steps changed the weights"
    for (engine, stage), weights in one[name].items():
        _close(weights, reference, f"1 process, {engine} ZeRO-{stage}")
    for rank, runs in enumerate(two):
        for (engine, stage), weights in runs[name].items():
            _close(weights, reference, f"2 ranks (rank {rank}), {engine} ZeRO-{stage}")
    if name in ("cola", "hybrid"):  # the objective's own parameters trained, inside the model
        assert any(k.startswith("parts.") for k in reference)


def _initial(name: str) -> dict:
    from trainer.models.encoders import build_encoder
    from trainer.objectives import ObjectiveContext, build_objective
    from trainer.train.config import ModelConfig, ObjectiveConfig

    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name=name, **EXTRA.get(name, {})), ModelConfig(proj_hidden=16, proj_dim=8),
                          ObjectiveContext(num_classes=3, num_clips=2 * B))
    return obj.build_model(build_encoder("resnet18", in_channels=1, width=4)).state_dict()


@pytest.mark.e2e
@pytest.mark.parametrize("name", CACHED)
def test_gradient_caching_under_zero_2_and_3_equals_ddp(engine_runs, name):
    """Chunks of 2 clips on two ranks; batch norm sees each chunk's statistics, so the
    reference is DDP with the same chunks on the same number of ranks."""
    for rank, runs in enumerate(engine_runs[2]):
        cached = runs[(name, "cached")]
        assert set(cached) == {("ddp", 0), ("deepspeed", 2), ("deepspeed", 3)}
        for (engine, stage), weights in cached.items():
            _close(weights, cached[("ddp", 0)], f"{name}, gradient caching, rank {rank}: {engine} ZeRO-{stage}")


# ---------------------------------------------------------------------- the command line
TOTAL = 16  # the kill lands after step 4's checkpoint, long before the end even on a busy machine


def _cmd(shards, run_dir, stage, *extra):
    return [*tiny_overrides(shards, run_dir), f"train.max_steps={TOTAL}", "train.engine=deepspeed",
            f"deepspeed.zero_stage={stage}", *extra]


def _launch(ranks: int, args: list) -> list:
    if ranks == 1:
        return [PYTHON, "-m", "trainer.cli.pretrain", *args]
    return [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "trainer.cli.pretrain", *args]


def _cpu_bf16() -> bool:
    from trainer.parallel.device import cpu_computes_bf16
    return cpu_computes_bf16()


@pytest.mark.e2e
@pytest.mark.parametrize("ranks,stage,precision", [
    (1, 2, "fp32"), (1, 3, "fp32"), (2, 2, "fp32"), (2, 3, "fp32"),
    pytest.param(1, 1, "bf16", marks=pytest.mark.skipif(not _cpu_bf16(), reason="a CPU without bf16"))])
def test_killed_and_resumed_equals_uninterrupted(tiny_shards, tmp_path, ranks, stage, precision):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    use = f"deepspeed.precision={precision}"
    out = subprocess.run(_launch(ranks, _cmd(tiny_shards, ref, stage, use)), env=cli_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    again = _launch(ranks, _cmd(tiny_shards, killed, stage, use, "train.ckpt_every=4"))
    proc = subprocess.Popen(again, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker, deadline = killed / "checkpoints" / "step_00000004", time.time() + 240
    while not marker.is_dir():
        assert proc.poll() is None, f"the run to be killed ended by itself (exit {proc.returncode})"
        assert time.time() < deadline, "no checkpoint at step 4 within 240 s"
        time.sleep(0.005)
    if ranks == 1:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        for pid in kill_launch(proc.pid):  # every rank, as a lost node would
            while alive(pid):
                time.sleep(0.01)
    proc.wait(timeout=60)
    done = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert f"step_{TOTAL:08d}" not in done, "the run finished before it was killed"
    again = _launch(ranks, _cmd(tiny_shards, killed, stage, use, "train.ckpt_every=4"))  # a fresh port
    out = subprocess.run(again, env=cli_env(), capture_output=True, text=True, timeout=300)
    problems = [line for line in out.stderr.splitlines() if "rror" in line or "rank" in line.lower()][-40:]
    assert out.returncode == 0 and "resumed from" in out.stderr, "\n".join(problems)
    final = f"checkpoints/step_{TOTAL:08d}"
    meta = json.loads((killed / final / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["zero_stage"] == stage and meta["world_size"] == ranks
    assert meta["precision"] == precision
    shards = [n for n in meta["sha256"] if n.startswith("engine/deepspeed/")]
    if stage:
        assert len([n for n in shards if "optim_states" in n]) == ranks, "one ZeRO shard per rank, listed"
    a, b = checkpoint_weights(ref / final), checkpoint_weights(killed / final)
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{key} differs after resuming at {done}: {out.stderr[-2000:]}"
    assert not list((killed / final / "engine").glob("*.py")), "a checkpoint holds no code"


def _plain(out: subprocess.CompletedProcess, code: int) -> str:
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr


def _pretrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "trainer.cli.pretrain", *args], env=cli_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
def test_a_checkpoint_resumes_only_where_it_fits(tiny_shards, tmp_path):
    run = tmp_path / "run"
    _plain(_pretrain(*_cmd(tiny_shards, run, 2), "train.max_steps=2"), 0)
    folder = run / "checkpoints" / "step_00000002"
    err = _plain(_pretrain(*tiny_overrides(tiny_shards, run), "train.max_steps=3"), 2)
    assert "cannot resume here: it was written by the deepspeed engine and this run uses ddp" in err
    assert "deepspeed.zero_stage=2" in err and f"model.pretrained={folder}" in err
    err = _plain(_pretrain(*_cmd(tiny_shards, run, 3), "train.max_steps=3"), 2)
    assert "written under ZeRO-2 and this run uses ZeRO-3" in err
    # what the message offers works: a new run from the DeepSpeed checkpoint's weights
    _plain(_pretrain(*tiny_overrides(tiny_shards, tmp_path / "new"), "train.max_steps=1",
                     f"model.pretrained={folder}"), 0)
    ddp = tmp_path / "ddp"
    _plain(_pretrain(*tiny_overrides(tiny_shards, ddp), "train.max_steps=2"), 0)
    err = _plain(_pretrain(*_cmd(tiny_shards, ddp, 1), "train.max_steps=3"), 2)
    assert "written by the ddp engine and this run uses deepspeed" in err and "train.engine=ddp" in err


@pytest.mark.e2e
def test_a_pickle_planted_in_a_deepspeed_shard_is_refused_and_never_run(tiny_shards, tmp_path):
    import hashlib

    from tests.trainer.faults.test_faults import Payload
    run, marker = tmp_path / "run", tmp_path / "code_ran"
    _plain(_pretrain(*_cmd(tiny_shards, run, 2), "train.max_steps=2"), 0)
    folder = run / "checkpoints" / "step_00000002"
    (shard,) = (folder / "engine" / "deepspeed").glob("zero_pp_rank_0_*")
    torch.save({"optimizer_state_dict": Payload(marker)}, shard)
    meta = json.loads((folder / "meta.json").read_text())  # re-sealed, as whoever planted it would
    meta["sha256"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in meta["sha256"]}
    (folder / "meta.json").write_text(json.dumps(meta))
    err = _plain(_pretrain(*_cmd(tiny_shards, run, 2), "train.max_steps=3"), 1)
    assert not marker.exists() and f"{shard}: refused" in err, err


@pytest.mark.e2e
@pytest.mark.parametrize("override,words", [
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: '4' is not one of 0, 1, 2, 3"),
    ("deepspeed.config={zero_optimisation: {stage: 1}}", "deepspeed.config.zero_optimisation: not a DeepSpeed "
                                                         "config key (did you mean zero_optimization"),
    ("deepspeed.config={train_batch_size: 64}", "deepspeed.config.train_batch_size: audioclr sets this itself; "
                                                "use data.batch_size"),
    ("deepspeed.config={zero_optimization: {stage: 3}}", "use deepspeed.zero_stage"),
    ("deepspeed.config={zero_optimization: {no_such_knob: 1}}", "DeepSpeed refused the configuration"),
    ("deepspeed.precision=fp16", "deepspeed.precision: fp16 needs a CUDA device"),
    ("optim.name=lars", "optim.name: lars scales each layer by its own trust ratio"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params: needs zero_stage 3"),
])
def test_bad_deepspeed_settings_exit_2_naming_the_key(tiny_shards, tmp_path, override, words):
    err = _plain(_pretrain(*_cmd(tiny_shards, tmp_path / "run", 1), override), 2)
    assert words in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_shipped_recipe_passes_the_deepspeed_check_at_every_stage(stage):
    """Any recipe runs under DeepSpeed unchanged: what ZeRO cannot use it leaves off, with a line."""
    from trainer.parallel.deepspeed_engine import DeepSpeedEngine
    from trainer.train.config import PretrainConfig, load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(PretrainConfig, path, ["train.engine=deepspeed", f"deepspeed.zero_stage={stage}"])
        left_off = DeepSpeedEngine.check(cfg, torch.device("cpu"))
        assert DeepSpeedEngine.memory_format(cfg) == torch.contiguous_format
        assert any("channels_last" in line for line in left_off) == cfg.train.channels_last, path.name


@pytest.mark.e2e
def test_the_demo_recipe_trains_under_deepspeed_with_channels_last_left_off(tiny_shards, tmp_path):
    out = _pretrain("--config", str(REPO / "configs" / "demo.yaml"), *tiny_overrides(tiny_shards, tmp_path / "run"),
                    "train.engine=deepspeed", "deepspeed.zero_stage=2", "train.max_steps=2")
    err = _plain(out, 0)
    assert "train.channels_last: off under DeepSpeed" in err and "deepspeed ZeRO-2" in err, err
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


def test_bf16_on_a_cpu_without_it_and_offload_without_memory_are_refused(monkeypatch):
    import psutil

    import trainer.parallel.deepspeed_engine
    from dataio.errors import ConfigError
    from trainer.models.encoders import build_encoder
    from trainer.train.config import PretrainConfig, load_config

    check_section = trainer.parallel.deepspeed_engine.DeepSpeedEngine.check
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer.parallel.deepspeed_engine, "cpu_computes_bf16", lambda: False)
    cfg = load_config(PretrainConfig, None, ["data.shards=x", "deepspeed.precision=bf16"])
    with pytest.raises(ConfigError, match="deepspeed.precision: bf16 asked for, but this CPU has no bf16"):
        check_section(cfg, cpu)
    cfg = load_config(PretrainConfig, None, ["data.shards=x", "model.encoder=resnet50", "deepspeed.zero_stage=3",
                                             "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"])
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 20))
    model = build_encoder("resnet50", in_channels=1, width=64)  # counted from the model the engine is given
    with pytest.raises(ConfigError, match=r"deepspeed.offload_optimizer: offloading needs about 0\.\d GiB"):
        trainer.parallel.deepspeed_engine.check_offload_memory(
            cfg.deepspeed, sum(p.numel() for p in model.parameters()), torch.optim.SGD(model.parameters(), 0.1))


@pytest.mark.e2e
def test_eval_and_a_tune_sweep_read_an_encoder_trained_under_zero_3(tiny_shards, tmp_path):
    import yaml

    run = tmp_path / "run"
    _plain(_pretrain(*_cmd(tiny_shards, run, 3), "train.max_steps=2"), 0)
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "eval", "--run", str(run), "--data", str(tiny_shards),
                          "--protocol", "knn"], env=cli_env(), capture_output=True, text=True, timeout=300)
    _plain(out, 0)
    assert list((run / "eval").rglob("knn*.json"))
    sweep = {"name": "zero3", "storage": str(tmp_path / "sweeps"), "encoders": [str(run)], "data": str(tiny_shards),
             "protocol": "finetune", "space": {"finetune.alpha": {"grid": [0.5]}}, "ray": {"num_cpus": 2},
             "eval": {"val_fraction": 0.25, "finetune": {"epochs": 1, "batch_size": 4, "loss": "hybrid"}}}
    config = tmp_path / "sweep.yaml"
    config.write_text("# audioclr tune --config sweep.yaml\n" + yaml.safe_dump(sweep))
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "tune", "--config", str(config)], env=cli_env(),
                         capture_output=True, text=True, timeout=600)
    _plain(out, 0)
    assert "1 trial(s), 0 failed" in out.stdout


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher")
def test_the_deepspeed_launcher_with_a_hostfile_as_two_nodes(tiny_shards, tmp_path):
    """Two nodes of one process each on loopback, as on a cluster without ssh between nodes:
    the same hostfile everywhere, one ``deepspeed --no_ssh --node_rank=N`` per node."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen([shutil.which("deepspeed"), f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={n}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "--module", "trainer.cli.pretrain",
                               *_cmd(tiny_shards, run, 2), "train.max_steps=2"],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in range(2)]
    for node in nodes:
        output, _ = node.communicate(timeout=300)
        assert node.returncode == 0, output[-3000:]
    meta = json.loads((run / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["engine"] == "deepspeed"
    assert (run / "encoder.safetensors").is_file()


def test_what_resumes_where():
    """The resume check of each engine, without a run: engine, stage, precision, ranks."""
    from trainer.parallel.ddp_engine import DDPEngine
    from trainer.parallel.deepspeed_engine import DeepSpeedEngine
    from trainer.parallel.engines import how_to_resume

    ddp = SimpleNamespace(name="ddp")
    zero2 = SimpleNamespace(name="deepspeed", stage=2, section=SimpleNamespace(precision="fp32"))
    zero0 = SimpleNamespace(name="deepspeed", stage=0, section=SimpleNamespace(precision="fp32"))
    saved_ddp = {"engine": "ddp"}
    saved_z2 = {"engine": "deepspeed", "zero_stage": 2, "precision": "fp32"}
    assert DDPEngine.can_load(ddp, saved_ddp, 4, 2) is None, "DDP resumes at any world size"
    assert "written by the deepspeed engine" in DDPEngine.can_load(ddp, saved_z2, 2, 2)
    assert DeepSpeedEngine.can_load(zero2, saved_z2, 2, 2) is None
    assert "written by 2 ranks, this run has 4" in DeepSpeedEngine.can_load(zero2, saved_z2, 4, 2)
    assert DeepSpeedEngine.can_load(zero0, {**saved_z2, "zero_stage": 0}, 4, 2) is None, "ZeRO-0 splits nothing"
    assert "its weights are bf16" in DeepSpeedEngine.can_load(zero2, {**saved_z2, "precision": "bf16"}, 2, 2)
    text = how_to_resume({**saved_z2, "world_size": 2}, "ckpt/step_00000010")
    assert "deepspeed.zero_stage=2 deepspeed.precision=fp32 on 2 rank(s)" in text
    assert "model.pretrained=ckpt/step_00000010" in text
