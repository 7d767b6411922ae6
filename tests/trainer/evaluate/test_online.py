"""The online probe (``eval.online``): scores during training equal `audioclr eval` on the
export, a resumed run continues the curve, two ranks share the work, bad folders stop the
run at start and a failed score does not end it."""

import json
import logging
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import PYTHON, cli_env, tiny_overrides
from tests.shard_utils import make_shards
from trainer.cli.pretrain import main as pretrain_main
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.run import run_eval
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import run as pretrain_run

STEPS_PER_EPOCH = 6  # tiny_shards: 24 clips, batch 4


@pytest.fixture(scope="module")
def noisy_probe(tmp_path_factory):
    """48 tones of three classes in two folds under loud noise: scores between chance and 1."""
    folder = tmp_path_factory.mktemp("noisy_probe")
    make_shards(folder, [12, 12, 12, 12], seconds=0.8, noise=3.0)
    return folder


def _online(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "online_knn" in line]


def _config(shards, run_dir, *extra, probe=None):
    return load_config(PretrainConfig, None, [*tiny_overrides(shards, run_dir), "train.epochs=2",
                                              f"eval.online={probe or shards}", "eval.every=1", *extra])


def test_online_scores_equal_audioclr_eval_of_the_export(tiny_shards, noisy_probe, tmp_path, caplog):
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="audioclr.online")
    assert pretrain_run(_config(tiny_shards, run_dir, "eval.linear=true", probe=noisy_probe)) == "finished"
    records = _online(run_dir)
    assert [r["step"] for r in records] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert [r["epoch"] for r in records] == [1.0, 2.0] and all(r["online_seconds"] > 0 for r in records)
    for protocol in ("knn", "linear"):
        result = run_eval(run_dir, noisy_probe, EvalConfig(pictures=False), protocol)
        score = records[-1][f"online_{protocol}"]
        assert 0.2 < score < 0.95, "a probe set that tells encoders apart"
        assert score == result["metrics"]["class_averaged_accuracy"]["mean"]
    assert "online probe:" in caplog.text and "% of the" in caplog.text


def test_a_finished_run_resumed_with_a_probe_scores_once_and_says_so(tiny_shards, noisy_probe, tmp_path, caplog):
    """Issue 36, row 3: the docs' online-probe command after the demo resumed the finished
    demo, trained 0 steps, scored nothing and said "pretraining finished". Now it says the
    run had finished and the probe scores the encoder once; without a probe, how to go on."""
    run_dir = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [*tiny_overrides(tiny_shards, run_dir), "train.max_steps=3"])
    assert pretrain_run(cfg) == "finished" and not _online(run_dir)
    caplog.set_level(logging.INFO, logger="audioclr.pretrain")
    assert pretrain_run(cfg) == "finished"
    assert "had already finished (step 3 of 3): nothing to train; raise train.epochs" in caplog.text
    cfg = load_config(PretrainConfig, None, [*tiny_overrides(tiny_shards, run_dir), "train.max_steps=3",
                                             f"eval.online={noisy_probe}", "eval.every=1"])
    assert pretrain_run(cfg) == "finished"
    assert [r["step"] for r in _online(run_dir)] == [3] and "the online probe scores its encoder once" in caplog.text


def test_the_probe_is_off_by_default_and_leaves_the_metrics_alone(tiny_shards, tmp_path):
    cfg = load_config(PretrainConfig, None, [*tiny_overrides(tiny_shards, tmp_path), "train.max_steps=3"])
    assert pretrain_run(cfg) == "finished" and not _online(tmp_path)


def test_a_failed_score_is_a_warning_and_training_goes_on(tiny_shards, tmp_path, monkeypatch, caplog):
    import trainer.evaluate.online as online

    real, calls = online.embed_clips, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "embed_clips", flaky)
    assert pretrain_run(_config(tiny_shards, tmp_path)) == "finished"
    assert "online probe at step 6 skipped: RuntimeError: the disk went away; training goes on" in caplog.text
    assert [r["step"] for r in _online(tmp_path)] == [12]


@pytest.mark.parametrize("problem", ["missing", "no labels", "no folds", "sample rate", "bad every"])
def test_an_unfit_online_folder_stops_the_run_at_start(tiny_shards, tmp_path, capsys, problem):
    folder = tmp_path / "probe"
    extra = []
    if problem == "no labels":
        make_shards(folder, [6, 6])
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "vocabulary": []}))
    elif problem == "no folds":
        make_shards(folder, [6, 6], folds=False)
    elif problem == "sample rate":
        make_shards(folder, [6, 6], rate=8000)
    elif problem == "bad every":
        extra = ["eval.every=0"]
    code = pretrain_main([*tiny_overrides(tiny_shards, tmp_path / "run"), f"eval.online={folder}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    want = {"missing": str(folder), "no labels": "no label vocabulary", "no folds": "carry a fold",
            "sample rate": "8000 Hz", "bad every": "eval.every"}[problem]
    assert want in err and ("eval.online=" in err or problem == "bad every"), err
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing trained"


@pytest.mark.e2e
def test_a_resumed_run_continues_its_curve(tiny_shards, tmp_path):
    from tests.trainer.checkpoint.test_resume import _run_until

    def cmd(run_dir):
        return [PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(tiny_shards, run_dir), "train.max_steps=30",
                f"eval.online={tiny_shards}", "eval.every=1", "train.ckpt_every=7", "data.num_workers=3",
                "data.persistent_workers=false"]

    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cmd(ref), env=cli_env(), check=True, capture_output=True)
    _run_until(cmd(killed), killed / "checkpoints" / "step_00000014", signal.SIGKILL)
    assert not (killed / "encoder.json").exists(), "the run finished before it was killed"
    subprocess.run(cmd(killed), env=cli_env(), check=True, capture_output=True)
    strip = [{k: v for k, v in r.items() if k != "online_seconds"} for r in _online(killed)]
    assert [r["step"] for r in strip] == [6, 12, 18, 24, 30]
    assert strip == [{k: v for k, v in r.items() if k != "online_seconds"} for r in _online(ref)]


@pytest.mark.e2e
def test_a_folder_that_disappears_mid_run_costs_nothing(tiny_shards, tmp_path):
    probe = tmp_path / "probe"
    shutil.copytree(tiny_shards, probe)
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "trainer.cli.pretrain", *tiny_overrides(tiny_shards, run_dir), "train.max_steps=18",
           f"eval.online={probe}", "eval.every=1"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    shutil.rmtree(probe)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert [r["step"] for r in _online(run_dir)] == [6, 12, 18]


@pytest.mark.e2e
def test_two_ranks_share_the_embedding_and_score_as_eval_does(tiny_shards, noisy_probe, tmp_path):
    from tests.dist_utils import free_port
    from tests.trainer.test_torchrun import _torchrun

    run_dir = tmp_path / "run"
    out = subprocess.run([*_torchrun(), "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                          "-m", "trainer.cli.pretrain", *tiny_overrides(tiny_shards, run_dir), "train.epochs=2",
                          f"eval.online={noisy_probe}", "eval.every=1", "eval.linear=true"],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = _online(run_dir)
    assert [r["step"] for r in records] == [3, 6], "3 steps per epoch on two ranks"
    for protocol in ("knn", "linear"):
        result = run_eval(run_dir, noisy_probe, EvalConfig(pictures=False), protocol)
        assert records[-1][f"online_{protocol}"] == pytest.approx(
            result["metrics"]["class_averaged_accuracy"]["mean"], abs=1e-9)
