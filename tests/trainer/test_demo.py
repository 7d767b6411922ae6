"""The demo, shortened: corpus -> pretraining -> kNN; pretraining must beat chance."""

import json

import pytest

from trainer.cli.demo import DEMO_CONFIG, demo, report


def test_a_label_reading_objective_is_reported_as_a_supervised_reference(tmp_path, capsys):
    summary = {"num_classes": 10, "num_clips": 400, "k": 200, "knn_accuracy": 0.9, "knn_std": 0.0,
               "knn_accuracy_random_init": 0.2, "knn_std_random_init": 0.0, "trained_on": {},
               "seconds": {"total": 1.0, "pretrain": 1.0}}
    report({**summary, "objective_read_labels": False}, tmp_path)
    assert "upper reference" not in capsys.readouterr().out
    report({**summary, "objective_read_labels": True}, tmp_path)
    assert "read these clips' labels" in capsys.readouterr().out


@pytest.mark.e2e
def test_short_demo_beats_chance(tmp_path):
    summary = demo(tmp_path, DEMO_CONFIG, clips=120,
                   overrides=["train.epochs=6", "data.batch_size=32", "model.width=8",
                              "train.progress=false", "optim.warmup_steps=3"],
                   eval_overrides=["eval.knn.k=20"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["knn_accuracy"] == summary["knn_accuracy"]
    assert {"knn_accuracy", "knn_accuracy_random_init"} <= set(written) and written["objective_read_labels"] is False
    import torch

    from trainer.parallel.device import autocast_dtype
    dtype = autocast_dtype("fast", torch.device("cpu"))  # the demo recipe's precision, as this CPU resolves it
    assert written["trained_on"] == {"device": "cpu", "cpu_threads": torch.get_num_threads(), "world_size": 1,
                                     "autocast": str(dtype).replace("torch.", "") if dtype else "fp32"}, \
        "the result records the thread count and precision its numbers depend on"
    chance = 1 / summary["num_classes"]
    assert summary["num_classes"] == 10 and summary["num_clips"] == 120
    assert summary["knn_accuracy"] > chance + 0.1
    assert (tmp_path / "run" / "eval" / "corpus" / "knn.json").is_file()
    assert (tmp_path / "run" / "eval" / "corpus" / "knn_random_init.json").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*")), "TensorBoard events"


def test_the_demo_recipe_is_found_beside_the_package():
    """`audioclr demo` with no --config trains configs/demo.yaml (a move of the command
    once pointed it at a folder that does not exist)."""
    from tests.conftest import REPO

    assert DEMO_CONFIG == REPO / "configs" / "demo.yaml" and DEMO_CONFIG.is_file()
