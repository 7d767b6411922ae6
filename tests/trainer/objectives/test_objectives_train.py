"""Every objective trains end to end from a config, and its state (queue, key encoder,
memory bank) survives an interruption: stopped-and-resumed equals uninterrupted."""

import signal

import pytest
import torch

from tests.conftest import tiny_overrides
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import Pretrainer

OBJECTIVES = ["simclr", "looc", "moco", "npid", "cola", "supcon", "hybrid"]
EXTRA = {"moco": ["objective.queue_size=16", "objective.momentum_schedule=cosine"],
         "npid": ["objective.nce_noise=5"], "cola": ["objective.cola_dim=16"],
         "looc": ["data.num_views=3"]}


def _cfg(shards, run_dir, name, *more):
    return load_config(PretrainConfig, None, [*tiny_overrides(shards, run_dir), f"objective.name={name}",
                                              "train.max_steps=6", *EXTRA.get(name, []), *more])


def _train(cfg, stop_after=None):
    trainer = Pretrainer(cfg)
    if stop_after is not None:  # as a SIGTERM would: finish the step, save, leave
        step = trainer.train_step

        def stopping(batch):
            if trainer.step + 1 >= stop_after:
                trainer.stop.signal = signal.SIGTERM
            return step(batch)
        trainer.train_step = stopping
    try:
        return trainer.train(), trainer
    finally:
        trainer.close()


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_trains_and_resumes_exactly(tiny_shards, tmp_path, name):
    status, ref = _train(_cfg(tiny_shards, tmp_path / "ref", name))
    assert status == "finished" and (tmp_path / "ref" / "encoder.safetensors").is_file()
    status, _ = _train(_cfg(tiny_shards, tmp_path / "cut", name), stop_after=3)
    assert status == "interrupted"
    status, resumed = _train(_cfg(tiny_shards, tmp_path / "cut", name))
    assert status == "finished"
    for key, value in ref.engine.module.state_dict().items():
        assert torch.equal(value, resumed.engine.module.state_dict()[key]), key
    if name in ("cola", "hybrid"):  # the objective's own parameters are part of the model
        assert any(key.startswith("parts.") for key in ref.engine.module.state_dict())
    if name == "moco":
        assert torch.equal(ref.objective.queue.shard, resumed.objective.queue.shard)
    if name == "npid":
        assert torch.equal(ref.objective.bank.shard, resumed.objective.bank.shard)


def test_hybrid_without_labels_is_refused(tmp_path):
    import json

    from tests.shard_utils import make_shards
    make_shards(tmp_path / "s", [4, 4])
    raw = json.loads((tmp_path / "s" / "manifest.json").read_text())
    raw["vocabulary"] = []
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="labelled shards"):
        Pretrainer(_cfg(tmp_path / "s", tmp_path / "run", "hybrid"))
