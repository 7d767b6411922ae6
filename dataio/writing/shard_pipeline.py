"""The shard writer's stages, each run by worker processes; the main process only plans.

1. **List**: each listing part (a layout's label folder, or the whole layout; a list of
   clips already in hand is stored by the main process) is read by a worker, which stores
   its clips (:mod:`dataio.writing.shard_store`) and returns their count, wanted keys and labels.
2. **Encode**: the main process draws the seeded shuffled order of all N clips (N
   integers) and hands out chunks of it; a worker loads, checks and encodes a chunk's
   clips (:func:`~dataio.writing.shard_writer.process_clip`), spills the accepted ones to disk and
   returns their sizes and the rejections.
3. **Write**: from those sizes, in chunk order, :class:`~dataio.writing.shard_plan.ShardPlanner`
   cuts the shards exactly where one sink fed every accepted clip in order would, with
   the same corpus indices; a worker writes each planned shard (tar under a ``.tmp`` name,
   renamed, then its DALI index) from the spill. ``rejected.tsv`` and the manifest last.

So the bytes written depend on the items, seed and shard limits only: not on ``workers``,
on the chunk size or on the order in which workers finish; and they are the bytes of the
serial writer this replaced (``tests/dataio/test_shard_parallel.py`` holds its digests).
The main process's work is per chunk and per shard, plus the order and the keys
(integers and short strings, no clips).
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataio.atomic import write_text_atomically
from dataio.errors import ShardWriteError
from dataio.reading.manifest import Manifest, ShardInfo
from dataio.workers import shut_down, worker_pool
from dataio.writing.shard_plan import JSON_INDEX_OVERHEAD, ShardPlan, ShardPlanner, json_with_index
from dataio.writing.shard_store import ItemStore, make_work_dir, read_spill, spill_path, write_items, write_spill
from dataio.writing.shard_writer import (
    DEFAULT_SHARD_SIZE,
    REJECTED_NAME,
    ClipItem,
    Encoding,
    Loader,
    WriteReport,
    _one_line,
    base_key,
    check_encoding,
    check_loader,
    check_vocabulary,
    clip_json_rest,
    prepare_out_dir,
    remove_our_files,
    soundfile_loader,
    unique_keys,
)
from dataio.writing.sources.listing import SourceListing
from dataio.writing.tar_writer import ShardSink

CHUNK_CLIPS = 128  # clips per encoding task: small enough to balance workers, big enough to amortise a task
ListingPart = Callable[[], "SourceListing | list[ClipItem]"]


@dataclass(frozen=True)
class WriteSettings:
    """What every clip is written with: ``sample_rate`` in Hz, ``min_seconds`` in seconds."""

    dataset: str
    sample_rate: int = 16000
    min_seconds: float = 0.025
    encoding: Encoding = Encoding()
    loader: Loader = soundfile_loader


@dataclass
class PartListing:
    """What one listing part tells the main process: no clips, their wanted keys."""

    count: int
    keys: list[str]
    labels: set[str]
    listing: SourceListing  # its missing clips, vocabulary, id column and fold names; no items


def list_part(part: ListingPart | list[ClipItem], work: Path, number: int) -> PartListing:
    """Read listing part ``number`` (call it, or take the clips given) and store its clips."""
    result = part() if callable(part) else part
    listing = result if isinstance(result, SourceListing) else SourceListing(list(result))
    items, listing.items = listing.items, []
    count = write_items(work, number, items)
    labels = {label for item in items for label in item.labels}
    return PartListing(count, [base_key(item) for item in items], labels, listing)


@dataclass
class ChunkResult:
    """An encoded chunk: the payload sizes of its accepted clips (for ShardPlanner.feed),
    its rejections ``(listing index, path, reason)`` and the accepted clips' labels."""

    chunk: int
    clips: int
    sizes: np.ndarray
    rejected: list[tuple[int, str, str]]
    labels: set[str]
    multi_label: bool


def encode_chunk(work: Path, counts: list[int], chunk: int, positions: np.ndarray,
                 renamed: dict[int, str], settings: WriteSettings) -> ChunkResult:
    """Encode the clips at listing ``positions`` (in that order) and spill the accepted
    ones; ``renamed`` gives the keys made unique by a suffix, by listing index."""
    from dataio.writing.clip_encoding import process_clip  # deferred: workers encode (torch); the main process plans
    items = ItemStore(work, counts).items(positions)
    records, sizes, rejected, labels, multi = [], [], [], set(), False
    for position, item in zip(positions.tolist(), items):
        result = process_clip(item, settings.loader, settings.sample_rate, settings.min_seconds,
                              settings.encoding)
        if result.data is None:
            rejected.append((position, item.path, result.reason or "rejected"))
            continue
        rest = clip_json_rest(settings.dataset, item, result.frames / settings.sample_rate)
        records.append((renamed.get(position) or base_key(item), result.data, rest))
        sizes.append(len(result.data) + len(rest) + JSON_INDEX_OVERHEAD)
        labels.update(item.labels)
        multi = multi or len(item.labels) > 1
    write_spill(work, chunk, records)
    return ChunkResult(chunk, len(items), np.asarray(sizes, np.int64), rejected, labels, multi)


def write_planned_shard(work: Path, out_dir: Path, plan: ShardPlan, ext: str) -> ShardInfo:
    """Write shard ``plan.number`` from the spill: the tar (renamed from ``.tmp`` once
    whole), then its DALI index."""
    sink = ShardSink(out_dir, 0, 0, first=plan.number)
    index = plan.first_index
    for chunk, first, end in plan.segments:
        for key, data, rest in read_spill(work, chunk)[first:end]:
            sink.add(key, [(ext, data), ("json", json_with_index(index, rest))])
            index += 1
    sink.close()
    return sink.shards[0]


class _InlineExecutor(futures.Executor):
    """``workers=1``: every task runs in this process when submitted."""

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 -- raised again by result(), as a pool would
            future.set_exception(err)
        return future


def _executor(workers: int) -> futures.Executor:
    if workers == 1:
        return _InlineExecutor()
    # spawn, not fork: a parent that already ran torch ops may hold OpenMP threads
    return worker_pool(workers)


def _list_parts(pool: futures.Executor, parts: Sequence, work: Path) -> list[PartListing]:
    """Every listing part, read by the workers (clips already in hand: stored here)."""
    pending = [pool.submit(list_part, part, work, number) if callable(part) else None
               for number, part in enumerate(parts)]
    return [future.result() if future else list_part(part, work, number)
            for number, (part, future) in enumerate(zip(parts, pending))]


def _merged_listing(listed: list[PartListing]) -> SourceListing:
    """The parts' missing clips in order, with the first part's vocabulary and id column."""
    first = listed[0].listing if listed else SourceListing([])  # a folder with no label folders
    merged = SourceListing([], [], first.vocabulary, first.id_column, dict(first.fold_names))
    for part in listed:
        merged.missing.extend(part.listing.missing)
        merged.fold_names.update(part.listing.fold_names)
    return merged


def _renamed(listed: list[PartListing]) -> dict[int, str]:
    """Listing index -> key, for the clips whose wanted key :func:`unique_keys` changed."""
    wanted = [key for part in listed for key in part.keys]
    return {i: key for i, (key, base) in enumerate(zip(unique_keys(wanted), wanted)) if key != base}


@dataclass
class _Tally:
    num_clips: int = 0
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (listing index, path, reason)
    labels: set[str] = field(default_factory=set)
    multi_label: bool = False
    shards: dict[int, ShardInfo] = field(default_factory=dict)


class _Writer:
    """The main process's part of stages 2 and 3: hand out chunks, plan shards as the
    chunks before them are in, hand out shards, drop spills no shard still needs."""

    def __init__(self, pool, work: Path, out_dir: Path, counts: list[int], order: np.ndarray,
                 renamed: dict[int, str], settings: WriteSettings, planner: ShardPlanner, on_shard):
        self.pool, self.work, self.out_dir, self.counts = pool, work, out_dir, counts
        self.order, self.renamed, self.settings, self.planner = order, renamed, settings, planner
        self.on_shard, self.tally = on_shard, _Tally()
        self.num_chunks = -(-len(order) // CHUNK_CLIPS)
        self.done: dict[int, ChunkResult] = {}  # encoded, waiting for the chunks before them
        self.planned = 0  # chunks fed to the planner
        self.readers: Counter[int] = Counter()  # chunk -> shards being written from its spill
        self.pending: dict[futures.Future, tuple[str, int]] = {}  # -> ("chunk" or "shard", number)
        self.plans: dict[int, ShardPlan] = {}  # shards being written

    def run(self, workers: int, progress: bool) -> _Tally:
        submitted = 0
        with tqdm(total=len(self.order), unit="clip", desc="shard", disable=not progress) as bar:
            while submitted < self.num_chunks or self.pending:
                while submitted < self.num_chunks and self._encoding() < 2 * workers:
                    self._submit_chunk(submitted)
                    submitted += 1
                finished, _ = futures.wait(list(self.pending), return_when=futures.FIRST_COMPLETED)
                for future in sorted(finished, key=lambda f: self.pending[f][1]):  # any order would do
                    kind, number = self.pending.pop(future)
                    if kind == "chunk":
                        bar.update(future.result().clips)
                        self._chunk_done(future.result())
                    else:
                        self._shard_done(future.result())
        return self.tally

    def _encoding(self) -> int:
        return sum(kind == "chunk" for kind, _ in self.pending.values())

    def _submit_chunk(self, chunk: int) -> None:
        positions = self.order[chunk * CHUNK_CLIPS:(chunk + 1) * CHUNK_CLIPS]
        renamed = {i: self.renamed[i] for i in positions.tolist() if i in self.renamed} if self.renamed else {}
        future = self.pool.submit(encode_chunk, self.work, self.counts, chunk, positions, renamed, self.settings)
        self.pending[future] = ("chunk", chunk)

    def _chunk_done(self, result: ChunkResult) -> None:
        """Keep the tallies; plan every shard the chunks encoded so far, in order, complete."""
        self.tally.rejected.extend(result.rejected)
        self.tally.labels |= result.labels
        self.tally.multi_label = self.tally.multi_label or result.multi_label
        self.done[result.chunk] = result
        while self.planned in self.done:
            chunk = self.done.pop(self.planned)
            plans = self.planner.feed(chunk.chunk, chunk.sizes)
            self.planned += 1
            if self.planned == self.num_chunks:
                plans += self.planner.finish()
            for plan in plans:
                self._submit_shard(plan)
            self._drop_spill(chunk.chunk)

    def _submit_shard(self, plan: ShardPlan) -> None:
        for chunk, _, _ in plan.segments:
            self.readers[chunk] += 1
        future = self.pool.submit(write_planned_shard, self.work, self.out_dir, plan, self.settings.encoding.ext)
        self.pending[future] = ("shard", plan.number)
        self.plans[plan.number] = plan

    def _shard_done(self, info: ShardInfo) -> None:
        number = int(info.url[len("shard-"):-len(".tar")])
        self.tally.shards[number] = info
        if self.on_shard is not None:
            self.on_shard(self.out_dir / info.url, self.out_dir / info.index_file)
        for chunk, _, _ in self.plans.pop(number).segments:
            self.readers[chunk] -= 1
            self._drop_spill(chunk)

    def _drop_spill(self, chunk: int) -> None:
        """Delete a chunk's spill once every shard holding its clips is written."""
        if self.readers[chunk] == 0 and chunk < self.planned and chunk not in self.planner.open_chunks():
            del self.readers[chunk]
            spill_path(self.work, chunk).unlink(missing_ok=True)


def _finish(out_dir: Path, settings: WriteSettings, tally: _Tally, num_items: int,
            vocabulary: list[str] | None) -> int:
    """Write ``rejected.tsv``, then the manifest (last: a folder with one is whole); returns
    the number of rejections."""
    rejected = [(path, reason) for _, path, reason in sorted(tally.rejected)]
    write_text_atomically(out_dir / REJECTED_NAME, "path\treason\n" + "".join(
        f"{_one_line(path, 10_000)}\t{_one_line(reason)}\n" for path, reason in rejected))
    if tally.num_clips == 0:
        raise ShardWriteError(f"none of the {num_items} clips could be used; the reasons are "
                              f"listed in {out_dir / REJECTED_NAME}")
    vocab = sorted(tally.labels) if vocabulary is None else list(vocabulary)
    kinds = Counter(reason.split(":")[0].strip() for _, reason in rejected)
    Manifest(dataset=settings.dataset, sample_rate=settings.sample_rate, num_clips=tally.num_clips,
             shards=[tally.shards[n] for n in sorted(tally.shards)], vocabulary=vocab,
             multi_label=tally.multi_label,
             rejected={"clips": len(rejected), "reasons": dict(sorted(kinds.items())), "list": REJECTED_NAME},
             **settings.encoding.manifest_fields()).write(out_dir)
    return len(rejected)


def _plan_and_write(pool, work: Path, out_dir: Path, listed: list[PartListing], settings: WriteSettings,
                    limits: tuple[int, int], seed: int, workers: int, progress: bool, on_shard) -> _Tally:
    """Stages 2 and 3 over the stored listing."""
    counts = [part.count for part in listed]
    order = np.random.default_rng(seed).permutation(sum(counts))
    writer = _Writer(pool, work, out_dir, counts, order, _renamed(listed), settings,
                     ShardPlanner(*limits), on_shard)
    tally = writer.run(workers, progress)
    tally.num_clips = writer.planner.num_clips
    return tally


def _close(pool: futures.Executor, work: Path) -> None:
    """Shut the pool down and remove the working folder, the latter even when a stop cuts
    into the former (idempotent: the failure path may call it again)."""
    try:
        shut_down(pool)  # no worker still writing when the work dir goes
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_parts(parts: Sequence[ListingPart | list[ClipItem]], out_dir: str | Path, settings: WriteSettings, *,
                shard_size: int = 0, shard_bytes: int = 0, seed: int = 0, workers: int = 0,
                overwrite: bool = False, vocabulary: list[str] | None = None, progress: bool = True,
                on_shard=None, no_clips: str = "no clips to write") -> tuple[WriteReport, SourceListing]:
    """:func:`dataio.writing.shard_writer.write_shards` over a listing in ``parts``: callables run
    by the workers (each returning a :class:`SourceListing` or a list of clips; the
    listing is their clips in part order) or lists of clips. Returns the report and the
    parts' listing without its clips (missing clips, vocabulary, fold names). Without
    ``vocabulary`` the parts' own (the first part's) is used, if any. An empty listing
    raises ShardWriteError(``no_clips``); a failure leaves no folder this call created."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    check_loader(settings.loader, workers)
    check_encoding(settings.encoding, settings.sample_rate)
    created = not out_dir.exists()
    prepare_out_dir(out_dir, overwrite)
    limits = (shard_size, shard_bytes) if shard_size > 0 or shard_bytes > 0 else (DEFAULT_SHARD_SIZE, 0)
    work, pool = make_work_dir(out_dir), _executor(workers)
    try:
        listed = _list_parts(pool, parts, work)
        listing = _merged_listing(listed)
        vocabulary = listing.vocabulary if vocabulary is None else vocabulary
        num_items = sum(part.count for part in listed)
        if num_items == 0:
            raise ShardWriteError(no_clips)
        check_vocabulary(set().union(*(part.labels for part in listed)), vocabulary)
        tally = _plan_and_write(pool, work, out_dir, listed, settings, limits, seed, workers, progress, on_shard)
        _close(pool, work)
        num_rejected = _finish(out_dir, settings, tally, num_items, vocabulary)
    except BaseException:  # a stop or a failure anywhere, the closing included: no .tmp is left behind
        _close(pool, work)
        remove_our_files(out_dir, unfinished_only=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    report = WriteReport(tally.num_clips, [(p, r) for _, p, r in sorted(tally.rejected)], len(tally.shards),
                         out_dir, time.perf_counter() - start)
    assert len(report.rejected) == num_rejected
    return report, listing


def write_shards(items: Iterable[ClipItem], out_dir: str | Path, *, dataset: str,
                 sample_rate: int = 16000, shard_size: int = 0, shard_bytes: int = 0,
                 seed: int = 0, workers: int = 0, min_seconds: float = 0.025,
                 overwrite: bool = False, loader: Loader = soundfile_loader,
                 vocabulary: list[str] | None = None, progress: bool = True, on_shard=None,
                 encoding: Encoding = Encoding()) -> WriteReport:
    """Turn ``items`` into WebDataset shards, DALI indexes and a manifest in ``out_dir``.

    ``sample_rate`` in Hz; ``shard_size`` in clips and ``shard_bytes`` in payload bytes
    (a shard is cut at whichever is reached first; both 0 means 1000 clips); ``seed``
    fixes the shuffled order of clips in the shards; ``workers`` processes (0: one per
    CPU, 1: in this process); clips shorter than ``min_seconds`` seconds are rejected.
    The clip JSON's ``index`` runs 0..N-1 over accepted clips in shard order. The
    manifest is written last, so a folder with a manifest holds complete shards.
    Worker processes are spawned: a script calling this needs ``if __name__ == "__main__":``.
    ``on_shard(tar, index)`` is called as each shard is complete (an upload, for one).
    ``encoding`` says which clip format the members are written in (FLAC by default).
    """
    settings = WriteSettings(dataset=dataset, sample_rate=sample_rate, min_seconds=min_seconds,
                             encoding=encoding, loader=loader)
    return write_parts([list(items)], out_dir, settings, shard_size=shard_size, shard_bytes=shard_bytes,
                       seed=seed, workers=workers, overwrite=overwrite, vocabulary=vocabulary,
                       progress=progress, on_shard=on_shard)[0]
