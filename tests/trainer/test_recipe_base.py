"""Recipes written over a ``base:`` recipe, and every shipped recipe resolving to the
config recorded in tests/data/resolved_recipes.json.

A change to a recipe, a default or the loader that moves what a recipe trains shows up
here; when the move is meant, record the new resolution with
``python3 -m tests.trainer.test_recipe_base`` and review the fixture's diff.
"""

import json

import pytest
import yaml

from dataio.errors import ConfigError
from tests.conftest import REPO
from trainer.train.config import PretrainConfig, load_config, to_dict

CONFIGS = REPO / "configs"
FIXTURE = REPO / "tests" / "data" / "resolved_recipes.json"
RECIPES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def resolve(name: str) -> dict:
    """The recipe ``configs/name`` as written into a run (pretraining) or a sweep."""
    from trainer.tune.sweep import SweepConfig

    schema = SweepConfig if name.startswith("sweeps/") else PretrainConfig
    return json.loads(json.dumps(to_dict(load_config(schema, CONFIGS / name))))


def test_the_fixture_holds_every_recipe():
    assert sorted(json.loads(FIXTURE.read_text())) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_as_recorded(name):
    assert resolve(name) == json.loads(FIXTURE.read_text())[name]


def write(folder, name: str, tree: dict):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))  # the chain is in key order
    return path


def test_a_recipe_merges_over_its_chain_of_bases(tmp_path):
    write(tmp_path, "a.yaml", {"data": {"shards": "/a", "batch_size": 8, "num_views": 3},
                               "augment": {"gain": {"db": [-3, 3]}}, "optim": {"lr": 0.5, "milestones": [5]}})
    write(tmp_path, "b.yaml", {"base": "a.yaml", "data": {"batch_size": 16}, "optim": {"milestones": [2, 4]}})
    child = write(tmp_path, "sub/c.yaml", {"base": "../b.yaml", "augment": {}, "data": {"sources": [{"shards": "/c"}]}})
    cfg = load_config(PretrainConfig, child, ["optim.lr=0.3"])
    assert (cfg.data.batch_size, cfg.data.num_views, cfg.optim.milestones, cfg.optim.lr) == (16, 3, [2, 4], 0.3)
    assert cfg.augment == {} and load_config(PretrainConfig, tmp_path / "b.yaml").augment == {"gain": {"db": [-3, 3]}}
    assert cfg.data.shards == "" and [s["shards"] for s in cfg.data.sources] == ["/c"], "sources replace the shards"
    assert "base" not in to_dict(cfg)


def test_a_null_replaces_the_base_value_and_is_judged_by_the_schema(tmp_path):
    write(tmp_path, "a.yaml", {"data": {"shards": "/a"}, "augment": {"gain": {}, "rrc": {}}})
    child = write(tmp_path, "b.yaml", {"base": "a.yaml", "augment": {"rrc": None}})
    assert load_config(PretrainConfig, child).augment == {"gain": {}, "rrc": None}
    write(tmp_path, "c.yaml", {"base": "a.yaml", "augment": None})
    with pytest.raises(ConfigError, match="augment: expected a mapping"):
        load_config(PretrainConfig, tmp_path / "c.yaml")


def test_a_recipe_over_a_base_orders_the_chain_as_it_lists_it(tmp_path):
    """Issue 36, row 5: the base's key order won, so a recipe could not put a waveform op
    before the base's log-mel ops, and the error told it to do what it did."""
    write(tmp_path, "a.yaml", {"data": {"shards": "/a"}, "augment": {"gain": {}, "rrc": {}, "pitch_shift": {}}})
    write(tmp_path, "b.yaml", {"base": "a.yaml", "augment": {"speed": {}, "gain": {"db": [-3.0, 3.0]}}})
    assert list(load_config(PretrainConfig, tmp_path / "b.yaml").augment) == ["speed", "gain", "rrc", "pitch_shift"]
    write(tmp_path, "c.yaml", {"base": "a.yaml", "augment": {"pitch_shift": {"p": 0.0}}})  # a tweak moves nothing
    assert list(load_config(PretrainConfig, tmp_path / "c.yaml").augment) == ["gain", "rrc", "pitch_shift"]
    write(tmp_path, "d.yaml", {"base": "a.yaml", "augment": {"pitch_shift": {}, "rrc": {}}})
    assert list(load_config(PretrainConfig, tmp_path / "d.yaml").augment) == ["gain", "pitch_shift", "rrc"]
    write(tmp_path, "e.yaml", {"base": "a.yaml", "augment": {"speed": {}}})  # nothing says where: after the base's
    with pytest.raises(ConfigError, match=r"comes after log-mel op 'pitch_shift' in the chain \(gain, rrc, "
                                          r"pitch_shift, speed\).*unless the recipe also names an op"):
        load_config(PretrainConfig, tmp_path / "e.yaml")


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": {"base": "gone.yaml"}}, "a.yaml: base file not found: .*gone.yaml"),
    ({"a.yaml": {"base": "."}}, r"a.yaml: base .* is a folder, not a YAML file"),  # issue 36, row 11
    ({"a.yaml": {"base": "b.yaml"}, "b.yaml": {"base": "a.yaml"}}, "b.yaml: base a.yaml leads back to itself: "
     ".*a.yaml -> .*b.yaml -> .*a.yaml"),
    ({"a.yaml": {"base": "a.yaml"}}, "a.yaml: base a.yaml leads back to itself"),
    ({"a.yaml": {"base": ["b.yaml"]}}, "a.yaml: base: expected the file name of a recipe"),
    ({"a.yaml": {"base": "b.yaml"}, "b.yaml": {"data": {"shardz": "/b"}}}, "unknown key 'data.shardz'"),
])
def test_a_bad_base_is_an_error_naming_the_file(tmp_path, files, message):
    for name, tree in files.items():
        write(tmp_path, name, tree)
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, tmp_path / "a.yaml", ["data.backend=synthetic"])


@pytest.mark.parametrize("command", ["pretrain", "tune"])
def test_a_bad_base_is_exit_2_and_one_line(tmp_path, capsys, command):
    from trainer.cli import main

    write(tmp_path, "a.yaml", {"base": "b.yaml"})
    write(tmp_path, "b.yaml", {"base": "a.yaml"})
    assert main([command, "--config", str(tmp_path / "a.yaml")]) == 2
    err = capsys.readouterr().err
    assert "leads back to itself" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_logmel_front_end_of_a_recipe_comes_through_its_base(tmp_path):
    from dataio.writing.convert import frontend_from_recipe

    write(tmp_path, "a.yaml", {"frontend": {"n_mels": 40, "hop_ms": 20.0}})
    child = write(tmp_path, "b.yaml", {"base": "a.yaml", "frontend": {"hop_ms": 5.0}})
    frontend = frontend_from_recipe(str(child), 16000)
    assert (frontend.n_mels, frontend.hop_ms) == (40, 5.0)


def test_help_config_names_the_base_key(capsys):
    from trainer.cli import main

    assert main(["pretrain", "--help-config"]) == 0
    assert capsys.readouterr().out.startswith("base = ")


@pytest.mark.e2e
def test_the_demo_runs_a_recipe_written_over_demo_yaml(tmp_path):
    from dataio.writing.shard_pipeline import write_shards
    from dataio.writing.sources.demo import RATE, demo_items, synth_loader
    from trainer.cli.demo import demo

    write_shards(demo_items(16, seed=0, max_seconds=2.0), tmp_path / "corpus", dataset="demo", sample_rate=RATE,
                 shard_size=4, loader=synth_loader, workers=0, progress=False)
    recipe = CONFIGS / "demo_moco.yaml"
    assert "base" in yaml.safe_load(recipe.read_text())
    demo(tmp_path, recipe, clips=16, overrides=["train.max_steps=2", "data.batch_size=4", "model.width=4",
                                                 "objective.queue_size=8", "train.progress=false",
                                                 "train.tensorboard=false"], eval_overrides=["eval.knn.k=2"])
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    demo_chain = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["augment"]
    assert "base" not in written and written["augment"] == demo_chain and written["objective"]["name"] == "moco"
    assert (written["data"]["shards"], written["run_dir"]) == (str(tmp_path / "corpus"), str(tmp_path / "run"))
    assert written["train"]["epochs"] == 100 and written["model"]["proj_hidden"] == 256, "from demo.yaml"


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps({n: resolve(n) for n in RECIPES}, indent=1, sort_keys=True) + "\n")


def test_an_objective_key_the_objective_does_not_read_is_refused_or_reported(tmp_path, caplog):
    """Issue 37, item 5: each objective declares the objective.* keys it reads. One it does
    not read, set with the choice of objective (the same file or the command line), is
    refused by name; one inherited from before that choice (a base recipe for another
    objective) is reported, and changes nothing."""
    import logging

    from trainer.objectives import OBJECTIVES

    assert OBJECTIVES["cola"].reads == ("cola_dim", "global_negatives") and "alpha" in OBJECTIVES["hybrid"].reads
    with pytest.raises(ConfigError, match=r"objective\.temperature: objective cola does not read it"):
        load_config(PretrainConfig, CONFIGS / "demo_cola.yaml", ["data.shards=x", "objective.temperature=0.5"])
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"objective": {"name": "moco", "alpha": 0.3}, "data": {"shards": "x"}}))
    with pytest.raises(ConfigError, match=r"objective\.alpha: objective moco does not read it \(it reads temperature"):
        load_config(PretrainConfig, own)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"objective": {"name": "simclr", "temperature": 0.3}, "data": {"shards": "x"}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "base.yaml", "objective": {"name": "cola"}}))
    with caplog.at_level(logging.WARNING, logger="trainer.train.config"):
        assert load_config(PretrainConfig, child).objective.name == "cola"
        assert load_config(PretrainConfig, base, ["objective.name=cola"]).objective.name == "cola"
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "objective.temperature is set by a base recipe", "objective.temperature is set by the recipe"]
    caplog.clear()
    for recipe in sorted(CONFIGS.glob("*.yaml")):  # the shipped recipes read every key they set
        load_config(PretrainConfig, recipe, ["data.shards=x"])
    assert not caplog.records, [r.getMessage() for r in caplog.records]
