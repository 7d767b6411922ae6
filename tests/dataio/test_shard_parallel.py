"""The shard writer's parallel pipeline writes the serial writer's bytes: the digests below
were taken from the serial writer (commit 8997bb7) on tests/dataio/shard_fixture.py's
input, which has rejections (a loader error, clips too short) and colliding keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

import dataio.writing.shard_pipeline as pipeline
from dataio.errors import ShardWriteError
from dataio.writing.shard_pipeline import write_shards
from dataio.writing.shard_plan import ShardPlanner
from dataio.writing.shard_writer import WORK_DIR_NAME, Encoding
from dataio.writing.sources import listing_parts
from dataio.writing.sources.folder import folder_items
from tests.dataio.shard_fixture import fixture_items, fixture_loader, folder_digest

SERIAL_DIGESTS = {  # sha256 of every file written (names and bytes), serial writer of 8997bb7
    "size7": ({"shard_size": 7}, "7e15d5489e5d252cb961c3f75ac96555410850ec96d407ac827a22ab86d8ef92"),
    "bytes20k": ({"shard_bytes": 20000}, "c13d42fa408b286d8b6e8236fd353fd3d73fc79953d85d97893f93c479f0bc49"),
    "both": ({"shard_size": 10, "shard_bytes": 15000, "seed": 5},
             "1e9d019266507c9d9c85259660712ce59c33107da14feda1216ff80f5db4c6fa"),
    "default": ({}, "741f433ccac0bec426f997f228a81f2bd159a5e8105a6c1c9c2d3d0b0147c03e"),
    "pcm16": ({"shard_size": 9, "encoding": Encoding("pcm16")},
              "0e2450a095bdba43ac628e2938c851b13527d40297f22ceb50c0cfd40d85e251"),
}


def _write(out, workers: int, **options) -> str:
    write_shards(fixture_items(), out, dataset="fixture", loader=fixture_loader, workers=workers,
                 progress=False, **options)
    assert not (out / WORK_DIR_NAME).exists() and not list(out.glob("*.tmp"))
    return folder_digest(out)


@pytest.mark.parametrize("name", list(SERIAL_DIGESTS))
@pytest.mark.parametrize("chunk", [7, 128])  # chunks cut across shards, and one chunk for all
def test_same_bytes_as_the_serial_writer_in_one_process(name, chunk, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_CLIPS", chunk)
    options, digest = SERIAL_DIGESTS[name]
    assert _write(tmp_path / name, 1, **options) == digest


@pytest.mark.parametrize("name", ["size7", "bytes20k"])
def test_same_bytes_as_the_serial_writer_with_two_workers(name, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_CLIPS", 5)  # chunks finish out of order
    options, digest = SERIAL_DIGESTS[name]
    assert _write(tmp_path / name, 2, **options) == digest


def _serial_cuts(sizes: list[int], max_clips: int, max_bytes: int) -> list[int]:
    """Shard lengths by ShardSink's rule, clip by clip (the slow reference); the JSON index
    digits are added to each size as the planner does."""
    lengths, count, payload = [], 0, 0
    for index, size in enumerate(sizes):
        count, payload = count + 1, payload + size + len(str(index))
        if (max_clips and count >= max_clips) or (max_bytes and payload >= max_bytes):
            lengths.append(count)
            count, payload = 0, 0
    return lengths + ([count] if count else [])


@pytest.mark.parametrize("max_clips,max_bytes", [(7, 0), (0, 5000), (10, 3000), (1, 0), (0, 1)])
def test_planner_cuts_where_one_sink_would(max_clips, max_bytes):
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 900, 1000)
    planner, plans = ShardPlanner(max_clips, max_bytes), []
    bounds = np.cumsum(rng.integers(0, 40, 60))
    chunks = np.split(sizes, bounds[bounds < sizes.size])  # some chunks empty
    for number, chunk in enumerate(chunks):
        plans += planner.feed(number, chunk)
    plans += planner.finish()
    assert [plan.count for plan in plans] == _serial_cuts(sizes.tolist(), max_clips, max_bytes)
    assert [plan.number for plan in plans] == list(range(len(plans)))
    assert [plan.first_index for plan in plans] == np.cumsum([0] + [p.count for p in plans[:-1]]).tolist()


def test_folder_parts_list_what_folder_items_lists(tmp_path):
    for relative in ("b/x.wav", "a/deep/y.wav", "a/z.flac", "c/not.txt", ".hidden/w.wav"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    parts = listing_parts("folder", tmp_path)
    assert len(parts) == 3
    assert [item for part in parts for item in part()] == folder_items(tmp_path)


def test_an_empty_listing_leaves_no_folder(tmp_path):
    with pytest.raises(ShardWriteError, match="nothing here"):
        pipeline.write_parts([[]], tmp_path / "out", pipeline.WriteSettings("x"), workers=1,
                             no_clips="nothing here")
    assert not (tmp_path / "out").exists()


def test_the_working_files_are_plain_records_that_read_back_exactly(tmp_path):
    """The listing and the spill are data (JSON objects; length-prefixed bytes), never
    pickles: reading a working folder left by another run executes nothing."""
    from dataio.writing.shard_store import ItemStore, read_spill, spill_path, write_items, write_spill
    from dataio.writing.sources.item import ClipItem

    items = [ClipItem(f"a/{i}.wav", ["dog", "bark"], "train", i % 3 or None, None, {"seed": i, "class": "x"},
                      "balanced" if i % 2 else None) for i in range(5)]
    assert write_items(tmp_path, 0, items[:2]) == 2 and write_items(tmp_path, 1, items[2:]) == 3
    assert ItemStore(tmp_path, [2, 3]).items([4, 0, 2]) == [items[4], items[0], items[2]]
    assert json.loads((tmp_path / "items-00000.bin").read_bytes()[:int(np.load(tmp_path / "items-00000.npy")[1])])
    records = [("k0", bytes(range(256)) * 3, b'{"labels": []}'), ("clé", b"", b"{}")]
    write_spill(tmp_path, 7, records)
    assert read_spill(tmp_path, 7) == records and spill_path(tmp_path, 7).suffix == ".bin"
    with pytest.raises(ValueError, match="JSON"):
        write_items(tmp_path, 2, [ClipItem("b.wav", ["x"], extra={"f": object()})])


def test_a_pool_whose_start_a_stop_cut_short_shuts_down_without_a_traceback(monkeypatch):
    """The signal fuzzer: demo-corpus stopped by SIGTERM as its first `submit` started the
    pool's manager thread; shutting the pool down then raised "cannot join thread before it
    is started" (a traceback, exit 1). The pool's workers are ended instead."""
    import threading

    from dataio.stop_signal import Stopped
    from dataio.workers import shut_down, worker_pool

    pool = worker_pool(1)
    real_start = threading.Thread.start

    def stopped_start(thread):
        if "ExecutorManager" in type(thread).__name__:
            raise Stopped(15)  # as the handler raises it, inside start()
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", stopped_start)
    with pytest.raises(Stopped):
        pool.submit(int, "1")
    monkeypatch.setattr(threading.Thread, "start", real_start)
    workers = list(pool._processes.values())
    shut_down(pool)
    assert not any(p.is_alive() for p in workers)
