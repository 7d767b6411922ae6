"""Several corpora in one run (data.sources): mixed by weight, numbered apart, exact from
any start step and on two ranks, counted per corpus; bad lists refused by name."""

import json
import subprocess

import pytest
import torch

from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
from dataio.backends.torch_pipeline import wave_loader
from dataio.errors import ConfigError, ManifestError
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_sources
from tests.conftest import PYTHON, checkpoint_weights, cli_env, tiny_overrides
from tests.dist_utils import free_port
from tests.shard_utils import make_shards


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    make_shards(a, [20, 20, 20, 20], seconds=0.6)
    make_shards(b, [10, 10], seconds=0.6, seed=1)
    return a, b


def _sources(a, b, wa=3.0, wb=1.0):
    return [{"shards": str(a), "weight": wa, "name": "big"}, {"shards": str(b), "weight": wb, "name": "small"}]


def _epoch(cfg, manifest, rank, world, epoch=0, start_step=0):
    aug = build_augmenter(None, FrontendConfig(), cfg.view_seconds, num_views=2, pairs_per_clip=1, seed=0)
    place = Placement(rank=rank, world_size=world, seed=3, steps=steps_per_epoch(cfg, manifest, world))
    return list(wave_loader(cfg, manifest, aug, place, epoch=epoch, start_step=start_step, in_workers=False))


def test_corpora_are_mixed_by_weight_numbered_apart_and_exact_from_any_step(corpora):
    a, b = corpora
    cfg = DataConfig(sources=_sources(a, b), batch_size=5, num_workers=2, shuffle_buffer=8, view_seconds=0.5)
    manifest = load_sources(cfg.sources)
    assert manifest.num_clips == 100 and [s.name for s in manifest.sources] == ["big", "small"]
    batches = _epoch(cfg, manifest, 0, 1)
    assert len(batches) == 20, "an epoch counts the clips of all corpora"
    per_source = torch.stack([b.sources for b in batches]).sum(0).tolist()
    assert sum(per_source) == 100 and 60 <= per_source[0] <= 90, per_source  # 75 expected at 3:1
    indices = [int(i) for batch in batches for i in batch.indices]
    small = [i for i in indices if i >= 80]
    assert small and all(i < 100 for i in indices), "the second corpus is numbered after the first"
    assert len(small) == per_source[1]
    tail = _epoch(cfg, manifest, 0, 1, start_step=7)
    assert [t.keys for t in tail] == [b.keys for b in batches[7:]]
    assert all(torch.equal(t.payload, b.payload) for t, b in zip(tail, batches[7:]))
    ranks = [_epoch(cfg, manifest, r, 2) for r in range(2)]
    assert [len(r) for r in ranks] == [10, 10]


@pytest.mark.parametrize("sources,words", [
    ([{"shards": "A", "weight": -1}], "data.sources[0].weight: must be a positive number"),
    ([{"shards": "A", "weight": 0}], "data.sources[0].weight: must be a positive number"),
    ([{"shards": "A"}, {"shards": "A/"}], "data.sources[1]: A/ is listed twice"),
    ([{"shards": "A", "share": 2}], "data.sources[0]: unknown key(s) share"),
    (["A"], "data.sources[0]: expected a mapping, got 'A'"),
])
def test_bad_source_lists_are_named(tmp_path, sources, words):
    from trainer.train.config import PretrainConfig, load_config
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, [f"run_dir={tmp_path}", f"data.sources={json.dumps(sources)}"])
    assert words in str(err.value)
    with pytest.raises(ConfigError, match="give data.shards or data.sources, not both"):
        load_config(PretrainConfig, None, [f"data.shards={tmp_path}", 'data.sources=[{"shards": "B"}]'])


def test_corpora_at_different_rates_are_refused(tmp_path, corpora):
    from tests.shard_utils import make_shards as make
    make(tmp_path / "c", [4], rate=8000)
    with pytest.raises(ManifestError, match="different sample rates"):
        load_sources([{"shards": str(corpora[0])}, {"shards": str(tmp_path / "c")}])


@pytest.mark.e2e
def test_two_ranks_on_a_mix_resume_mid_epoch_exactly_and_count_each_corpus(corpora, tmp_path):
    import shutil
    a, b = corpora
    sources = json.dumps([{"shards": str(a), "weight": 2}, {"shards": str(b), "name": "small"}])
    args = [x for x in tiny_overrides(a, tmp_path / "whole") if not x.startswith("data.shards=")]
    launch = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"]

    def run(run_dir):
        cmd = [*launch, f"--master-port={free_port()}", "-m", "trainer.cli.pretrain",
               *[x if not x.startswith("run_dir=") else f"run_dir={run_dir}" for x in args],
               f"data.sources={sources}", "train.max_steps=16", "train.ckpt_every=7"]
        out = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole)
    # the same run as if stopped after step 7's checkpoint (mid-epoch: 12 steps per epoch)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_00000007", resumed / "checkpoints" / "step_00000007")
    shutil.copy(whole / "config.yaml", resumed / "config.yaml")
    out = run(resumed)
    assert "resumed from" in out.stderr
    final = "checkpoints/step_00000016"
    a_w, b_w = checkpoint_weights(whole / final), checkpoint_weights(resumed / final)
    assert all(torch.equal(a_w[k], b_w[k]) for k in a_w)
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    counted = [r for r in records if "epoch_clips_small" in r][0]  # the first epoch, whole: 12 steps
    assert counted["epoch_clips_small"] + counted["epoch_clips_tiny"] == 12 * 8
    assert counted["epoch_clips_tiny"] > counted["epoch_clips_small"], "weight 2 against 1"
