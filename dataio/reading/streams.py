"""The sample streams of one loader worker: which shards it reads each pass and in what
order, the seeded shuffle buffer, and the seek a mid-epoch resume starts from.

A worker's stream is a pure function of (seed, epoch, rank, worker, pass) and the shards'
member counts, and its shuffle buffer draws from a counter-based hash: a resume at step
``s`` plays the buffer with item numbers to find its state after the skipped samples,
reading none of them (:func:`seek`). What the resumed stream then reads is one shard
from the position reached, and the samples the buffer still held (at most
``shuffle_buffer``, in the one or two shards they came from): a resume late in an epoch
of millions of clips costs about what a resume at its start costs, locally and from a URL.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dataio.augment.keyed import M32, combine
from dataio.errors import NoReadableClips, ShardMismatch
from dataio.reading.manifest import Manifest
from dataio.reading.remote import Retry, shown, tar_samples

log = logging.getLogger(__name__)


def raw_samples(manifest: Manifest, shard_ids: list[int], tar_errors: list,
                 retry: Retry = Retry()) -> Iterator[dict]:
    """Samples ({'__key__', 'flac' | 'pcm' | 'mel', 'json'}) of the given shards, in order; a corrupt or
    truncated tar is logged, kept in ``tar_errors`` (not counted as skipped clips) and
    left behind. A shard URL is streamed (:mod:`dataio.reading.remote`); one that cannot be read
    stops the run with a RemoteError naming it."""
    def on_error(exc: Exception) -> bool:
        tar_errors.append(repr(exc))
        log.warning("skipping unreadable shard data: %s", exc.args[0] if exc.args and isinstance(exc.args[0], str)
                    else repr(exc))  # webdataset appends (stream, url) to the args: the sentence only
        return True

    paths = manifest.shard_paths()
    for sid in shard_ids:
        listed, count, errors_before = manifest.shards[sid].count, 0, len(tar_errors)
        for sample in tar_samples(paths[sid], on_error, retry):
            count += 1
            if count > listed:
                raise ShardMismatch(f"shard {shown(str(paths[sid]))} holds more samples than the {listed} its "
                                    f"manifest lists: the manifest of {manifest.where} does not describe its "
                                    f"shards; run `audioclr check-shards` on it, or shard the audio again")
            sample["__shard__"] = sid
            yield sample
        if count < listed and len(tar_errors) == errors_before:
            log.warning("shard %s holds %d of the %d samples its manifest lists; training on what it holds",
                        shown(str(paths[sid])), count, listed)


@dataclass(frozen=True)
class Ref:
    """A sample not read yet: the ``position``-th member group of shard ``sid``, which is the
    ``slot``-th shard of its pass's order."""

    sid: int
    slot: int
    position: int


def pass_shards(split, rank_seed: tuple, pass_no: int) -> list[int]:
    """The shard ids one reader reads in pass ``pass_no``, in order."""
    order = np.random.default_rng((*rank_seed, pass_no)).permutation(len(split.shards))
    return [split.shards[i] for i in order]


def worker_stream(manifest: Manifest, split, rank_seed: tuple, retry: Retry = Retry(),
                  start: tuple[int, int, int] = (0, 0, 0)) -> Iterator[tuple]:
    """Endless (pass number, raw sample) pairs of one worker: its shards in a fresh order
    each pass, keeping every ``stride``-th sample; raises if a whole pass is empty.
    ``start`` = (pass, slot, position): begin there (a seek; the samples before it in that
    shard are read past, the shards before it not at all)."""
    tar_errors: list = []
    ext = manifest.format.ext
    first_pass, first_slot, first_position = start
    for pass_no in itertools.count(first_pass):
        shard_ids = pass_shards(split, rank_seed, pass_no)
        slot, position = (first_slot, first_position) if pass_no == first_pass else (0, 0)
        k = sum(manifest.shards[sid].count for sid in shard_ids[:slot])
        found = slot > 0 or position > 0  # a pass entered part way may have nothing left for this reader
        for i, sample in enumerate(raw_samples(manifest, shard_ids[slot:], tar_errors, retry)):
            if i >= position and (k + i) % split.sample_stride == split.sample_offset and ext in sample:
                found = True
                yield pass_no, sample
        if not found:
            urls = [manifest.shards[i].url for i in split.shards]
            raise NoReadableClips(f"no readable clip in shard(s) {', '.join(urls[:5])}"
                                  + (f" (+{len(urls) - 5} more)" if len(urls) > 5 else "")
                                  + (f" of {manifest.where}: {tar_errors[-1]}" if tar_errors else
                                     f" of {manifest.where}") + "; check them with `audioclr check-shards`")


def resampled_stream(manifest: Manifest, rng_key: tuple, retry: Retry = Retry(),
                      ids: list[int] | None = None) -> Iterator[tuple]:
    """Endless (draw number, raw sample) pairs of ``data.resampled``: whole shards drawn
    with replacement from all of them (or ``ids``), so any number of readers always has
    data. Raises once every shard has been drawn and none gave a sample."""
    rng = np.random.default_rng(rng_key)
    ids = list(range(len(manifest.shards))) if ids is None else ids
    tar_errors: list = []
    empty: set[int] = set()
    ext = manifest.format.ext
    for draw in itertools.count():
        sid = ids[int(rng.integers(len(ids)))]
        found = False
        for sample in raw_samples(manifest, [sid], tar_errors, retry):
            if ext in sample:
                found = True
                yield draw, sample
        if found:
            empty = set()
            continue
        empty.add(sid)
        if len(empty) == len(ids):
            raise NoReadableClips(f"no readable clip in any shard of {manifest.where}"
                                  + (f": {tar_errors[-1]}" if tar_errors else "")
                                  + "; check them with `audioclr check-shards`")


def mixed(streams: list[Iterator[tuple]], weights: np.ndarray, rng: np.random.Generator) -> Iterator[tuple]:
    """The samples of several corpora's streams, each next one taken from a corpus drawn
    with probabilities ``weights``."""
    while True:
        yield next(streams[int(rng.choice(len(streams), p=weights))])


class Shuffled:
    """A seeded shuffle buffer over (pass, sample) pairs that never mixes two passes (one
    pass over a worker's clips is yielded whole before the next begins), unless
    ``mix_passes`` (the draws of a resampled stream). The t-th pop takes the item at
    ``hash(key, t) mod len(buffer)``: a counter-based draw, so a seek computes the draws of
    a whole skip at once. Its whole state lives in attributes between two items (the
    buffer, the item pulled but not yet placed, the pass, the pops so far), so a seek can
    rebuild it mid-stream."""

    def __init__(self, stream: Iterator[tuple], size: int, key: int, mix_passes: bool = False):
        self.stream, self.size, self.key, self.mix_passes = stream, size, key, mix_passes
        self.buffer: list = []
        self.pending: tuple | None = None  # pulled from the stream, waiting for a pass to drain
        self.current = None  # the pass being buffered
        self.pops = 0

    def __iter__(self) -> Iterator[tuple]:
        while True:
            if self.pending is None:
                self.pending = next(self.stream, None)
                if self.pending is None:
                    break
            item = self.pending
            if not self.mix_passes and self.buffer and item[0] != self.current:
                yield self._pop()  # the pass before drains first, one item at a time
                continue
            self.pending, self.current = None, item[0]
            self.buffer.append(item)
            if len(self.buffer) >= self.size:
                yield self._pop()
        while self.buffer:
            yield self._pop()

    def _pop(self) -> tuple:
        draw = combine(self.key, self.pops & M32)
        self.pops += 1
        return self.buffer.pop(draw % len(self.buffer))


def seek(manifest: Manifest, split, rank_seed: tuple, retry: Retry, size: int, key: int, skip: int) -> Shuffled:
    """The :class:`Shuffled` stream of one reader (``worker_stream`` through a buffer of
    ``size``, keyed ``key``) after its first ``skip`` items, found without reading them: the
    buffer is played with item numbers (the j-th item of the stream, its pass j // per pass)
    and the draws of every pop computed at once; then the items the buffer holds are read
    (grouped by shard) and the stream goes on from the position reached. Equal, item for
    item, to reading the stream and dropping ``skip`` items, when the shards hold what the
    manifest lists."""
    per_pass = _per_pass(manifest, split)
    buffer, pending, current, pops, pulled = _play(per_pass, size, key, skip)
    held = buffer + ([pending] if pending is not None else [])
    passes: dict = {}
    refs = {j: _ref_of(manifest, split, rank_seed, per_pass, j, passes) for j in held}
    read = _read_refs(manifest, [ref for _, ref in refs.values()], retry)
    last = _ref_of(manifest, split, rank_seed, per_pass, pulled - 1, passes) if pulled else None
    go_on = _after(manifest, split, *last) if last else (0, 0, 0)
    resumed = Shuffled(worker_stream(manifest, split, rank_seed, retry, go_on), size, key)
    resumed.buffer = [(refs[j][0], read[int(refs[j][1].sid), refs[j][1].position]) for j in buffer]
    if pending is not None:
        resumed.pending = (refs[pending][0], read[int(refs[pending][1].sid), refs[pending][1].position])
    resumed.current, resumed.pops = current, pops
    return resumed


def _play(per_pass: int, size: int, key: int, skip: int) -> tuple:
    """:class:`Shuffled`'s loop over item numbers until ``skip`` items were yielded: (the
    buffer, the pending item, the current pass, the pops so far, the items pulled)."""
    draws = combine(np.int64(key), np.arange(skip, dtype=np.int64) & M32).tolist()  # the pops' hashes, at once
    buffer: list[int] = []
    pending, current, pulled, pops = None, None, 0, 0
    while pops < skip:
        if pending is None:
            pending, pulled = pulled, pulled + 1
        if buffer and pending // per_pass != current:
            buffer.pop(draws[pops] % len(buffer))
            pops += 1
            continue
        current = pending // per_pass
        buffer.append(pending)
        pending = None
        if len(buffer) >= size:
            buffer.pop(draws[pops] % len(buffer))
            pops += 1
    return buffer, pending, current, pops, pulled


def _mine(split, k: int, count: int) -> range:
    """The positions a reader keeps of a shard of ``count`` members whose first member is the
    ``k``-th of its pass (every ``sample_stride``-th of the pass, from ``sample_offset``)."""
    return range((split.sample_offset - k) % split.sample_stride, count, split.sample_stride)


def _pass_items(manifest: Manifest, split, rank_seed: tuple, pass_no: int) -> list[tuple[int, int, range]]:
    """(slot, shard id, kept positions) of each shard of a reader's pass, in pass order."""
    items, k = [], 0
    for slot, sid in enumerate(pass_shards(split, rank_seed, pass_no)):
        count = manifest.shards[sid].count
        items.append((slot, sid, _mine(split, k, count)))
        k += count
    return items


def _per_pass(manifest: Manifest, split) -> int:
    """How many items one reader's stream holds per pass (the same in every pass: the count
    of pass positions congruent to the offset does not depend on the shards' order)."""
    return sum(len(kept) for _, _, kept in _pass_items(manifest, split, (0,), 0))


def _ref_of(manifest: Manifest, split, rank_seed: tuple, per_pass: int, j: int, passes: dict) -> tuple[int, Ref]:
    """(pass, :class:`Ref`) of the ``j``-th item of a reader's stream (the j-th sample
    :func:`worker_stream` yields, counting each member group as holding its clip); ``passes``
    keeps each pass's shard table, built once."""
    pass_no, i = divmod(j, per_pass)
    if pass_no not in passes:
        items = _pass_items(manifest, split, rank_seed, pass_no)
        passes[pass_no] = (items, np.cumsum([len(kept) for _, _, kept in items]))
    items, ends = passes[pass_no]
    n = int(np.searchsorted(ends, i, side="right"))
    slot, sid, kept = items[n]
    return pass_no, Ref(sid, slot, kept[i - (int(ends[n - 1]) if n else 0)])


def _after(manifest: Manifest, split, pass_no: int, ref: Ref) -> tuple[int, int, int]:
    """Where the stream goes on after ``ref`` of pass ``pass_no``: (pass, slot, position)."""
    if ref.position + 1 < manifest.shards[ref.sid].count:
        return (pass_no, ref.slot, ref.position + 1)
    if ref.slot + 1 < len(split.shards):
        return (pass_no, ref.slot + 1, 0)
    return (pass_no + 1, 0, 0)


def _read_refs(manifest: Manifest, refs: list[Ref], retry: Retry) -> dict:
    """{(sid, position): sample} of the samples ``refs`` point at, each shard read once, up
    to the last member wanted."""
    found: dict = {}
    for sid in sorted({int(r.sid) for r in refs}):
        wanted, hits = {r.position for r in refs if r.sid == sid}, 0
        for position, sample in enumerate(raw_samples(manifest, [sid], [], retry)):
            if position in wanted:
                found[sid, position], hits = sample, hits + 1
                if hits == len(wanted):
                    break
        missing = sorted(p for p in wanted if (sid, p) not in found)
        if missing:
            raise ShardMismatch(f"shard {manifest.shards[sid].url} of {manifest.where} ended before member "
                                f"{missing[0]} that its manifest's count promised: the seek to a resume step "
                                f"cannot place it; run `audioclr check-shards` on the corpus")
    return found
