"""The demo, shortened: corpus -> pretraining -> kNN; pretraining must beat chance."""

import json

import pytest

from trainer.demo import DEMO_CONFIG, demo

pytestmark = pytest.mark.e2e


def test_short_demo_beats_chance(tmp_path):
    summary = demo(tmp_path, DEMO_CONFIG, clips=120,
                   overrides=["train.epochs=6", "data.batch_size=32", "model.width=8",
                              "train.progress=false", "optim.warmup_steps=3"],
                   eval_overrides=["eval.knn.k=20"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["knn_accuracy"] == summary["knn_accuracy"]
    assert {"knn_accuracy", "knn_accuracy_random_init"} <= set(written)
    import torch
    assert written["trained_on"] == {"device": "cpu", "cpu_threads": torch.get_num_threads(), "world_size": 1}, \
        "the result records the thread count its numbers depend on"
    chance = 1 / summary["num_classes"]
    assert summary["num_classes"] == 10 and summary["num_clips"] == 120
    assert summary["knn_accuracy"] > chance + 0.1
    assert (tmp_path / "run" / "eval" / "corpus" / "knn.json").is_file()
    assert (tmp_path / "run" / "eval" / "corpus" / "knn_random_init.json").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*")), "TensorBoard events"
