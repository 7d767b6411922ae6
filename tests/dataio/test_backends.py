"""The data back ends behind one interface (issue 37, item 2): each is a DataSource that
checks its own settings, opens, yields batches, reports its position and closes; a
registry replaces the if-chain, and nothing outside dataio compares a back end's name."""

import re

import pytest

from dataio.backends.batch import DataConfig
from dataio.backends.registry import BACKENDS, backend_class
from dataio.backends.source import DataSource
from dataio.errors import ConfigError
from tests.conftest import REPO


def test_every_back_end_is_a_data_source_that_opens_and_closes():
    for name, cls in BACKENDS.items():
        assert issubclass(cls, DataSource) and cls.name == name
        assert not cls.__abstractmethods__, name  # open and epoch filled in
    assert not backend_class("synthetic").reads_shards and not backend_class("dali").position_holds_at_any_world_size


@pytest.mark.parametrize("setting,key", [({"resampled": True}, "data.resampled"),
                                         ({"short_clips": "skip"}, "data.short_clips"),
                                         ({"view_gap": 0.5, "num_views": 3}, "data.view_gap")])
def test_the_dali_back_end_refuses_what_it_cannot_read_by_key(setting, key):
    cfg = DataConfig(shards="x", backend="dali", **setting)  # DataConfig alone knows no back end's limits
    backend_class("torch").check(cfg)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        backend_class("dali").check(cfg)


def test_pretraining_configs_are_checked_by_their_back_end():
    from trainer.train.config import PretrainConfig, load_config

    with pytest.raises(ConfigError, match=r"data\.short_clips: 'skip' needs backend torch"):
        load_config(PretrainConfig, None, ["data.shards=x", "data.backend=dali", "data.short_clips=skip"])


def test_nothing_outside_dataio_compares_a_back_ends_name():
    found = [f"{path.relative_to(REPO)}:{n}"
             for folder in ("trainer", "tools") for path in (REPO / folder).rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"backend[^=\n]*(==|!=) *['\"]", line)]
    assert found == []
