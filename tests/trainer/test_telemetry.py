"""Step telemetry in metrics.jsonl, the synthetic source, and the input-bound warning."""

import json
import logging
import os
import subprocess
import time

from tests.conftest import PYTHON, cli_env, tiny_overrides
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import Pretrainer

KEYS = {"data_wait_seconds", "forward_seconds", "backward_seconds", "optimizer_seconds", "allreduce_seconds",
        "rank_skew", "step_seconds_slowest_rank", "clips_per_second_per_rank", "data_wait_fraction",
        "peak_memory_mib"}


def _run(overrides, slow_data: float = 0.0):
    trainer = Pretrainer(load_config(PretrainConfig, None, overrides))
    if slow_data:
        timed = trainer._timed

        trainer._timed = lambda batches: timed(_sleepy(batches, slow_data))
    try:
        assert trainer.train() == "finished"
    finally:
        trainer.close()
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def _sleepy(batches, seconds):
    for batch in batches:
        time.sleep(seconds)
        yield batch


def test_synthetic_data_trains_without_shards_and_records_where_time_goes(tmp_path):
    records = _run([f"run_dir={tmp_path}", "data.backend=synthetic", "data.synthetic_clips=64", "data.batch_size=8",
                    "model.width=4", "model.proj_hidden=16", "model.proj_dim=8", "frontend.n_mels=32",
                    "data.view_seconds=0.5", "train.epochs=1", "train.log_every=2", "train.progress=false",
                    "train.tensorboard=false"])
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        phases = r["forward_seconds"] + r["backward_seconds"] + r["optimizer_seconds"]
        assert 0 < phases <= r["step_seconds_slowest_rank"] * 1.05
        assert r["rank_skew"] == 1.0 and r["allreduce_seconds"] == 0.0 and r["peak_memory_mib"] > 0
        assert r["data_wait_fraction"] < 0.1, "the synthetic source costs nothing"


def test_an_input_bound_run_is_warned_about(tiny_shards, tmp_path, caplog, monkeypatch):
    import trainer.train.telemetry

    monkeypatch.setattr(trainer.train.telemetry, "WARN_WINDOW", 2)  # judged over 2 steps, not 50
    with caplog.at_level(logging.WARNING, logger="audioclr.telemetry"):
        records = _run([*tiny_overrides(tiny_shards, tmp_path), "train.max_steps=4", "train.log_every=2"],
                       slow_data=0.5)
    assert records[-1]["data_wait_fraction"] > 0.1 and records[-1]["data_wait_seconds"] >= 0.5
    assert any("input-bound" in m and "waits for data" in m for m in caplog.messages)


def test_threads_auto_leaves_a_busy_core_alone(monkeypatch):
    import os

    import torch

    import trainer.threads as threads

    ticks = iter([{0: (0, 0), 1: (0, 0)}, {0: (95, 100), 1: (3, 100)}])  # core 1 busy with other work
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(ticks))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.set_threads(0, torch.device("cpu")) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # torchrun's or the user's choice stands
        torch.set_num_threads(2)
        assert threads.set_threads(0, torch.device("cpu")) == 2
        assert threads.set_threads(1, torch.device("cpu")) == 1, "a number is taken as given"
    finally:
        torch.set_num_threads(before)


def test_tensorboard_events_are_written_without_importing_an_installed_tensorflow(tmp_path):
    """Issue 36, row 10: with TensorFlow installed (HEAR's validator pulls it in), TensorBoard
    imported it to write events, and every training command printed its CUDA warnings. A
    stand-in ``tensorflow`` that says so when imported must stay unimported."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import sys\nsys.stderr.write('TENSORFLOW IMPORTED\\n')\n")
    script = ("import sys; from trainer.metrics import MetricWriter\n"
              f"w = MetricWriter({str(tmp_path / 'run')!r}, True, True); w.write(1, {{'loss': 0.5}}); w.tb.close()\n"
              "print('tensorflow' in sys.modules)\n")
    (tmp_path / "run").mkdir()
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])
    done = subprocess.run([PYTHON, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TENSORFLOW IMPORTED" not in done.stderr and done.stdout.strip() == "False", done.stderr[-2000:]
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
