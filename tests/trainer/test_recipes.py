"""The six seed recipes: each loads, and trains two steps on a demo corpus at its sample rate."""

from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import Pretrainer

RECIPES = ["uclser_fsdnoisy18k", "cola_audioset", "augcola_audioset", "moco_fsd50k", "npid_fsd50k",
           "soundclr_esc50"]
SMALL = {"moco_fsd50k": ["objective.queue_size=32"], "npid_fsd50k": ["objective.nce_noise=8"]}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from dataio.writing.shard_pipeline import write_shards
    from dataio.writing.sources.demo import demo_items, synth_loader

    made = {}

    def corpus(rate: int) -> Path:
        if rate not in made:
            out = tmp_path_factory.mktemp(f"demo{rate}")
            write_shards(demo_items(16, seed=0, max_seconds=2.0), out, dataset="demo", sample_rate=rate,
                         shard_size=8, loader=synth_loader, workers=0, progress=False)
            made[rate] = out
        return made[rate]
    return corpus


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps_on_the_demo_corpus(corpora, tmp_path, name):
    path = REPO / "configs" / f"{name}.yaml"
    assert path.read_text().startswith(f"# audioclr pretrain --config configs/{name}.yaml")
    recipe = load_config(PretrainConfig, path)
    shards = corpora(recipe.frontend.sample_rate)
    cfg = load_config(PretrainConfig, path, [f"data.shards={shards}", f"run_dir={tmp_path / 'run'}",
                                             "data.batch_size=4", "data.num_workers=1", "model.width=8",
                                             "train.max_steps=2", "train.progress=false",
                                             "train.tensorboard=false", *SMALL.get(name, [])])
    trainer = Pretrainer(cfg)
    try:
        assert trainer.train() == "finished"
    finally:
        trainer.close()
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
