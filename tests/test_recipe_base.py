"""Every shipped recipe resolves to the config recorded in tests/data/resolved_recipes.json.

A change to a recipe, a default or the loader that moves what a recipe trains shows up
here; when the move is meant, record the new resolution with
``python3 -m tests.test_recipe_base`` and review the fixture's diff.
"""

import json

import pytest

from tests.conftest import REPO
from trainer.config import PretrainConfig, load_config, to_dict

CONFIGS = REPO / "configs"
FIXTURE = REPO / "tests" / "data" / "resolved_recipes.json"
RECIPES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))


def resolve(name: str) -> dict:
    """The recipe ``configs/name`` as written into a run (pretraining) or a sweep."""
    from trainer.tune import SweepConfig

    schema = SweepConfig if name.startswith("sweeps/") else PretrainConfig
    return json.loads(json.dumps(to_dict(load_config(schema, CONFIGS / name))))


def test_the_fixture_holds_every_recipe():
    assert sorted(json.loads(FIXTURE.read_text())) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_as_recorded(name):
    assert resolve(name) == json.loads(FIXTURE.read_text())[name]


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps({n: resolve(n) for n in RECIPES}, indent=1, sort_keys=True) + "\n")
