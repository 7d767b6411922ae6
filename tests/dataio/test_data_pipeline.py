"""Splitting over ranks and workers, per-epoch reshuffle, equal step counts, determinism."""

import numpy as np
import pytest
import torch

from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, LoaderFailure, Placement, steps_per_epoch
from dataio.backends.torch_pipeline import wave_loader
from dataio.errors import ConfigError, ManifestError
from dataio.formats.codec import ClipCodec
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest, split_for_reader, split_for_worker
from tests.shard_utils import make_shards


def _augmenter(cfg, augment=None, frontend=None):
    return build_augmenter(augment, frontend or FrontendConfig(), cfg.view_seconds, num_views=cfg.num_views,
                           pairs_per_clip=cfg.pairs_per_clip, seed=3)


def _epoch(manifest, cfg, epoch, rank, world, start_step=0):
    place = Placement(rank=rank, world_size=world, seed=3, steps=steps_per_epoch(cfg, manifest, world))
    return list(wave_loader(cfg, manifest, _augmenter(cfg), place, epoch=epoch, start_step=start_step,
                            in_workers=False))


def _indices(batches):
    return [int(i) for b in batches for i in b.indices]


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("even"), [10] * 8)


def test_two_ranks_two_workers_see_every_clip_once_per_epoch(even):
    cfg = DataConfig(shards=str(even.root), batch_size=5, num_workers=2, shuffle_buffer=7)
    orders = []
    for epoch in range(2):
        seen = [i for rank in range(2) for i in _indices(_epoch(even, cfg, epoch, rank, 2))]
        assert sorted(seen) == list(range(80))
        orders.append(seen)
    assert orders[0] != orders[1], "each epoch reshuffles"


def test_fewer_shards_than_workers_split_by_sample(tmp_path):
    manifest = make_shards(tmp_path, [12, 12])
    cfg = DataConfig(shards=str(tmp_path), batch_size=4, num_workers=3, shuffle_buffer=5)
    assert sorted(_indices(_epoch(manifest, cfg, 0, 0, 1))) == list(range(24))


def test_uneven_shards_give_every_rank_the_same_number_of_steps(tmp_path):
    manifest = make_shards(tmp_path, [3, 17, 5, 9, 11, 2])
    cfg = DataConfig(shards=str(tmp_path), batch_size=4, num_workers=2)
    steps = steps_per_epoch(cfg, manifest, 2)
    assert steps == 47 // 8
    for epoch in range(3):
        counts = [len(_epoch(manifest, cfg, epoch, rank, 2)) for rank in range(2)]
        assert counts == [steps, steps]


def test_batches_hold_two_views_of_the_right_length(even):
    cfg = DataConfig(shards=str(even.root), batch_size=5, num_workers=0, view_seconds=0.5)
    batch = _epoch(even, cfg, 0, 0, 1)[0]
    assert batch.payload.shape == (5, 2, 8000)
    assert not torch.equal(batch.payload[:, 0], batch.payload[:, 1])
    assert batch.labels.tolist() == [i % 3 for i in batch.indices.tolist()]


def test_starting_mid_epoch_gives_the_same_batches(even):
    cfg = DataConfig(shards=str(even.root), batch_size=5, num_workers=2, shuffle_buffer=7)
    full = _epoch(even, cfg, 1, 1, 2)
    tail = _epoch(even, cfg, 1, 1, 2, start_step=3)
    assert len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        assert a.keys == b.keys
        assert torch.equal(a.payload, b.payload)


def test_truncated_shard_is_logged_and_left_behind_not_counted_as_clips(tmp_path, caplog):
    manifest = make_shards(tmp_path, [10, 10])
    path = tmp_path / "shard-00001.tar"
    path.write_bytes(path.read_bytes()[:9000])  # truncated mid-member
    cfg = DataConfig(shards=str(tmp_path), batch_size=4, num_workers=0)
    batches = _epoch(manifest, cfg, 0, 0, 1)
    assert len(batches) == 5
    assert sum(b.skipped for b in batches) == 0  # "skipped" counts clips that failed, not tar errors
    assert "skipping unreadable shard data" in caplog.text and "shard-00001.tar" in caplog.text


def test_missing_shard_named_at_start(tmp_path):
    make_shards(tmp_path, [4, 4])
    (tmp_path / "shard-00001.tar").unlink()
    with pytest.raises(ManifestError, match="shard-00001.tar"):
        load_manifest(tmp_path)


def test_split_helpers():
    assert split_for_reader([0, 1, 2, 3, 4], 1, 2, 0, 1).shards == (1, 3)
    assert split_for_worker([0, 2, 4], 1, 2).shards == (2,)
    w = split_for_worker([1], 1, 2)
    assert (w.shards, w.sample_stride, w.sample_offset) == ((1,), 2, 1)
    assert np.array_equal(sorted(split_for_worker([0, 1, 2, 3], 0, 2).shards), [0, 2])


def test_multi_label_shards_give_multi_hot_labels(tmp_path):
    import json

    manifest = make_shards(tmp_path, [6, 6])
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["multi_label"] = True
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path)
    assert manifest.label_target(["c2", "c0", "nope"]).tolist() == [1.0, 0.0, 1.0]
    cfg = DataConfig(shards=str(tmp_path), batch_size=4, num_workers=0)
    batch = _epoch(manifest, cfg, 0, 0, 1)[0]
    assert batch.labels.shape == (4, 3) and batch.labels.dtype == torch.float32
    for row, index in zip(batch.labels.tolist(), batch.indices.tolist()):
        assert row.index(1.0) == index % 3 and sum(row) == 1.0


def test_pairs_per_clip_draw_several_view_sets_from_one_decode(even):
    cfg = DataConfig(shards=str(even.root), batch_size=6, num_workers=0, pairs_per_clip=3, view_seconds=0.3)
    assert steps_per_epoch(cfg, even, 1) == 80 // 2
    batch = _epoch(even, cfg, 0, 0, 1)[0]
    idx = batch.indices.tolist()
    assert batch.payload.shape == (6, 2, 4800)
    assert idx[0] == idx[1] == idx[2] != idx[3] == idx[4] == idx[5]
    assert not torch.equal(batch.payload[0], batch.payload[1])


@pytest.mark.parametrize("augment", [None, {"gain": {}, "rrc": {}, "time_mask": {}}], ids=["plain", "chain"])
def test_workers_run_the_augmentation_stage_for_a_cpu_device(even, augment):
    from dataio.backends.torch_pipeline import DeviceFeeder

    cfg = DataConfig(shards=str(even.root), batch_size=5, num_workers=1)
    aug = _augmenter(cfg, augment, FrontendConfig(n_mels=32))
    place = Placement(seed=3, steps=2)
    waves = next(iter(wave_loader(cfg, even, aug, place, epoch=0, start_step=0, in_workers=False)))
    mels = next(iter(wave_loader(cfg, even, aug, place, epoch=0, start_step=0, in_workers=True)))
    assert mels.staged and not waves.staged and mels.payload.dim() == 5  # views [B, V, C, F, T], not waves
    feed = DeviceFeeder(aug, ClipCodec.of(even), place)
    assert torch.allclose(feed(waves).views, feed(mels).views, atol=1e-4)


def test_one_process_and_two_ranks_see_the_same_augmented_views(even):
    """Per-clip draws are keyed on the clip, not on the rank or batch it lands in."""
    from dataio.backends.torch_pipeline import DeviceFeeder

    chain = {"gain": {}, "speed": {"p": 0.5}, "noise": {}, "rrc": {}, "time_mask": {}, "pitch_shift": {}}
    cfg = DataConfig(shards=str(even.root), batch_size=4, num_workers=1, view_seconds=0.5)
    aug = _augmenter(cfg, chain, FrontendConfig(n_mels=32))

    def views(rank, world):
        place = Placement(rank=rank, world_size=world, seed=3, steps=steps_per_epoch(cfg, even, world))
        feed = DeviceFeeder(aug, ClipCodec.of(even), place)
        batches = wave_loader(cfg, even, aug, place, epoch=1, start_step=0, in_workers=False)
        return {i: v for b in map(feed, batches) for i, v in zip(b.indices.tolist(), b.views)}

    one = views(0, 1)
    two = {**views(0, 2), **views(1, 2)}
    assert set(one) == set(two) == set(range(80))
    for index in one:
        torch.testing.assert_close(one[index], two[index], rtol=0, atol=1e-6)


def test_view_gap_keeps_the_views_of_a_clip_apart():
    from dataio.backends.views import crop_starts

    rng = np.random.default_rng(0)
    for n in (20000, 24000, 32000, 48000, 100000):
        for _ in range(50):
            starts = crop_starts(n, 8000, 3, rng, gap=8000)
            room = n - 8000
            assert min(starts) >= 0 and max(starts) <= room
            spread = np.diff(sorted(starts))
            assert spread.min() >= min(8000, room // 2)
    assert crop_starts(4000, 8000, 2, rng, gap=8000)[0] <= 0, "a short clip is still padded"


@pytest.mark.parametrize("counts", [[7], [3, 5], [4, 4, 4], [2, 3, 4, 5, 6]])
@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
def test_every_clip_is_read_once_per_pass_whatever_the_shards_ranks_and_workers(counts, world, workers):
    order = list(range(len(counts)))[::-1]  # the epoch's shard order, shared by all ranks
    seen, order_keys = [], {}
    for rank in range(world):
        for worker in range(workers):
            split = split_for_reader(order, rank, world, worker, workers)
            if split.sample_stride > 1:  # readers splitting the samples of the same shards read them alike
                assert order_keys.setdefault(split.shards, split.order_key) == split.order_key
            stream = [(s, i) for s in split.shards for i in range(counts[s])]
            mine = [x for k, x in enumerate(stream) if k % split.sample_stride == split.sample_offset]
            if sum(counts) >= world * workers:
                assert mine, f"reader {rank}/{worker} gets no clip"
            seen += mine
    assert sorted(seen) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))


def test_a_run_long_loader_gives_every_epoch_what_fresh_loaders_give(even):
    """data.persistent_workers: one loader across epochs, its workers never restarted, yields
    what a fresh loader per epoch yields, from any start (3 workers, steps not a multiple)."""
    from dataio.backends.batch import Placement
    cfg = DataConfig(shards=str(even.root), batch_size=5, num_workers=3, shuffle_buffer=7)
    steps = steps_per_epoch(cfg, even, 2)
    assert steps % 3, "the workers' turns must cross epoch boundaries unevenly"
    place = Placement(rank=1, world_size=2, seed=3, steps=steps)
    fresh = _epoch(even, cfg, 1, 1, 2, start_step=2) + _epoch(even, cfg, 2, 1, 2) + _epoch(even, cfg, 3, 1, 2)
    endless = iter(wave_loader(cfg, even, _augmenter(cfg), place, epoch=1, start_step=2, in_workers=False,
                               run_long=True))
    long = [next(endless) for _ in fresh]
    assert [(b.epoch, b.step) for b in long] == [(b.epoch, b.step) for b in fresh]
    for a, b in zip(fresh, long):
        assert a.keys == b.keys and torch.equal(a.payload, b.payload)


@pytest.mark.parametrize("persistent", [True, False])
def test_persistent_workers_live_across_epochs_and_die_when_an_epoch_is_left(even, persistent):
    from dataio.backends.torch_pipeline import TorchSource
    cfg = DataConfig(shards=str(even.root), batch_size=5, num_workers=2, shuffle_buffer=7,
                     persistent_workers=persistent)
    place = Placement(rank=0, world_size=1, seed=3, steps=steps_per_epoch(cfg, even, 1))
    source = TorchSource(cfg, even, _augmenter(cfg), place)
    pids = []
    for epoch in range(3):
        batches = list(source.epoch(epoch, 0))
        assert len(batches) == place.steps
        pids.append(sorted(w.pid for w in source._batches._workers) if source._batches is not None else None)
    if persistent:
        assert pids[0] == pids[1] == pids[2] and pids[0], "the same worker processes serve every epoch"
    else:
        assert pids == [None] * 3, "each epoch's loader is closed at its end"
    for _ in zip(range(2), source.epoch(3, 0)):  # left after 2 steps, as a stop or max_steps leaves it
        pass
    assert source._batches is None, "an epoch left early closes its loader"
    again = list(source.epoch(3, 2))  # and a later request starts where it is asked
    assert len(again) == place.steps - 2
    source.close()


def test_resampled_shards_feed_any_number_of_readers_and_resume_exactly(tmp_path):
    """data.resampled: one shard, 2 ranks x 3 workers: every reader draws whole shards with
    replacement, so all have data; an epoch is counted in clips; batches depend on the
    step alone (a loader started mid-epoch gives the same ones)."""
    manifest = make_shards(tmp_path, [12])
    cfg = DataConfig(shards=str(tmp_path), batch_size=2, num_workers=3, shuffle_buffer=5, resampled=True)
    steps = steps_per_epoch(cfg, manifest, 2)
    assert steps == 12 // 4
    ranks = [_epoch(manifest, cfg, 1, rank, 2) for rank in range(2)]
    assert [len(r) for r in ranks] == [steps, steps]
    assert all(0 <= i < 12 for r in ranks for i in _indices(r))
    assert _indices(ranks[0]) != _indices(ranks[1]), "the ranks draw their own streams"
    tail = _epoch(manifest, cfg, 1, 1, 2, start_step=2)
    assert [b.keys for b in tail] == [b.keys for b in ranks[1][2:]]
    assert all(torch.equal(a.payload, b.payload) for a, b in zip(tail, ranks[1][2:]))
    assert _indices(_epoch(manifest, cfg, 2, 0, 2)) != _indices(ranks[0]), "each epoch draws anew"


def test_resampled_shards_that_hold_nothing_readable_are_named(tmp_path):
    manifest = make_shards(tmp_path, [4, 4])
    for name in ("shard-00000.tar", "shard-00001.tar"):
        (tmp_path / name).write_bytes(b"not a tar file at all" * 100)
    cfg = DataConfig(shards=str(tmp_path), batch_size=2, num_workers=0, resampled=True)
    batches = _epoch(manifest, cfg, 0, 0, 1)
    assert isinstance(batches[0], LoaderFailure) and "no readable clip in any shard" in batches[0].message
    from dataio.backends.registry import backend_class

    with pytest.raises(ConfigError, match="data.resampled: needs backend torch"):  # the DALI back end's own check
        backend_class("dali").check(DataConfig(shards=str(tmp_path), backend="dali", resampled=True))


@pytest.mark.parametrize("counts,world,workers,buffer", [([10] * 8, 2, 2, 7), ([3, 17, 5, 9, 11, 2], 1, 1, 1),
                                                         ([12, 12], 1, 3, 5), ([4, 6, 5], 2, 1, 64)])
def test_a_seek_to_any_point_reads_what_reading_there_reads(tmp_path, counts, world, workers, buffer, monkeypatch):
    """Issue 35, item 5: a resume read every sample it skipped (50 us a clip locally, every
    byte again from a URL). The seek plays the shuffle buffer with item numbers and reads
    only the buffer's samples and the shard it lands in: the samples that follow are the
    same, item for item, at every skip, across pass boundaries, for every reader."""
    import itertools

    import dataio.reading.streams as streams

    manifest = make_shards(tmp_path, counts, seconds=0.05)
    order = list(np.random.default_rng(0).permutation(len(counts)))
    read = []
    real = streams.tar_samples
    monkeypatch.setattr(streams, "tar_samples", lambda loc, *a: read.append(loc) or real(loc, *a))
    total = sum(counts)
    for rank, worker in itertools.product(range(world), range(workers)):
        split = split_for_reader(order, rank, world, worker, workers)
        rank_seed, key = (3, 1, *split.order_key), 1000 + 10 * rank + worker
        reading = streams.Shuffled(streams.worker_stream(manifest, split, rank_seed), buffer, key)
        plain = list(itertools.islice(iter(reading), 3 * total))
        for skip in sorted({1, buffer - 1, buffer, total // 3, total - 1, total, total + 2, 2 * total + 1}):
            if skip < 1 or skip >= len(plain):
                continue
            read.clear()
            sought = streams.seek(manifest, split, rank_seed, streams.Retry(), buffer, key, skip)
            got = list(itertools.islice(iter(sought), len(plain) - skip))
            assert [(p, s["__key__"]) for p, s in got] == [(p, s["__key__"]) for p, s in plain[skip:]], skip
            assert all(bytes(a[1]["flac"]) == bytes(b[1]["flac"]) for a, b in zip(got[:5], plain[skip:]))
    big = make_shards(tmp_path / "big", [50] * 40, seconds=0.01)  # 2,000 clips, a seek to the last of them
    split = split_for_reader(list(range(40)), 0, 1, 0, 1)
    read.clear()
    sought = streams.seek(big, split, (3, 0, 0, 0), streams.Retry(), 16, 5, 1990)
    assert len(list(itertools.islice(iter(sought), 10))) == 10
    assert len(read) <= 3, f"a seek reads the shards it lands in, not the {len(read)} it passed"


def test_a_seek_into_a_shard_shorter_than_its_manifest_says_is_named(tmp_path):
    """The seek trusts the manifest's counts to place itself; a shard that ends before a
    member the counts promise stops the resume naming the shard, never a silent misplacement."""
    import itertools
    import json

    import dataio.reading.streams as streams
    from dataio.errors import ShardMismatch

    manifest = make_shards(tmp_path, [6, 6], seconds=0.05)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["shards"][1]["count"], raw["shards"][0]["count"] = 9, 3  # shard 1 holds 6; the total still agrees
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path)
    split = split_for_reader([0, 1], 0, 1, 0, 1)
    with pytest.raises(ShardMismatch, match=r"shard-00001\.tar .* ended before member [678]"):
        list(itertools.islice(iter(streams.seek(manifest, split, (0,), streams.Retry(), 4, 0, 10)), 2))


def test_a_temporary_folder_too_long_for_a_workers_socket_is_refused_by_name(even, tmp_path, monkeypatch):
    """With TMPDIR past 75 characters a loader worker's send of a batch fails in a thread of
    its own ("AF_UNIX path too long") and the run waited for that batch forever; now the
    loader is refused before it starts, naming TMPDIR and the way out."""
    import tempfile

    from dataio.workers import SOCKET_PATH_MAX, SOCKET_SUFFIX

    cfg = DataConfig(shards=str(even.root), batch_size=4, num_workers=1)
    aug = _augmenter(cfg, None, FrontendConfig(n_mels=32))
    place = Placement(seed=3, steps=2)
    base = f"{tmp_path}/"
    longest = base + "t" * (SOCKET_PATH_MAX - SOCKET_SUFFIX - len(base))  # the socket path just fits
    monkeypatch.setattr(tempfile, "tempdir", longest)
    wave_loader(cfg, even, aug, place, epoch=0, start_step=0, in_workers=False)
    monkeypatch.setattr(tempfile, "tempdir", longest + "t")
    with pytest.raises(ConfigError, match=r"too long .*set TMPDIR to a shorter folder .*data\.num_workers=0"):
        wave_loader(cfg, even, aug, place, epoch=0, start_step=0, in_workers=False)
    cfg = DataConfig(shards=str(even.root), batch_size=4, num_workers=0)
    wave_loader(cfg, even, aug, place, epoch=0, start_step=0, in_workers=False)  # no worker, no socket
