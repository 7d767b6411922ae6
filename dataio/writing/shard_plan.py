"""Where shards are cut, decided from the sizes of the encoded clips alone.

The shard writer (:mod:`dataio.writing.shard_pipeline`) encodes clips in chunks of the shuffled
order, in any order over worker processes, and keeps each chunk's members in a spill
file. :class:`ShardPlanner` is fed the chunks' accepted clip sizes in chunk order and
says which clips each shard holds and the corpus index of its first clip, by the rule
:class:`dataio.writing.tar_writer.ShardSink` applies clip by clip (a shard is full once it holds
``max_clips`` clips or ``max_bytes`` bytes of members), so the shards come out as one
sink fed every accepted clip in shuffled order writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# '{"index": N, ' + the rest of the clip JSON without its first '{': 10 + 2 - 1 bytes
# besides N's digits (json.dumps writes ASCII)
JSON_INDEX_OVERHEAD = 11


def json_with_index(index: int, rest: bytes) -> bytes:
    """The clip JSON ``{"index": index, ...}`` from ``rest``, the JSON of the other fields
    as ``json.dumps`` writes it: byte for byte what ``json.dumps`` writes with ``index``
    as the first key."""
    return b'{"index": %d, ' % index + rest[1:]


def decimal_digits(values: np.ndarray) -> np.ndarray:
    """The number of decimal digits of each non-negative int64 in ``values``."""
    digits = np.ones(values.shape, np.int64)
    for power in range(1, 19):
        digits += values >= 10 ** power
    return digits


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its number, the corpus index of its first clip and where its
    clips are: ``(chunk, first, end)`` slices of the chunks' accepted clips, in order."""

    number: int
    first_index: int
    segments: tuple[tuple[int, int, int], ...]

    @property
    def count(self) -> int:
        return sum(end - first for _, first, end in self.segments)


@dataclass
class ShardPlanner:
    """Cuts the stream of accepted clips into shards (see the module's docstring).

    ``max_clips`` clips or ``max_bytes`` payload bytes (audio and JSON members) per shard;
    0 means no such limit. ``num_clips`` is the number of clips fed so far.
    """

    max_clips: int
    max_bytes: int
    num_clips: int = 0
    num_shards: int = 0
    _count: int = 0  # clips in the open shard
    _payload: int = 0  # bytes of members in the open shard
    _segments: list = field(default_factory=list)

    def feed(self, chunk: int, sizes: np.ndarray) -> list[ShardPlan]:
        """Take the next chunk's accepted clips and return the shards they complete.

        ``sizes[j]`` is accepted clip j's ``len(audio) + len(rest) + JSON_INDEX_OVERHEAD``
        in bytes: its payload but for the digits of its index, which only this count knows.
        """
        sizes = np.asarray(sizes, np.int64)
        sizes = sizes + decimal_digits(self.num_clips + np.arange(sizes.size, dtype=np.int64))
        plans, start = [], 0
        while start < sizes.size:
            taken = self._room(sizes[start:])
            self._segments.append((chunk, start, start + taken))
            self._count += taken
            self._payload += int(sizes[start:start + taken].sum())
            self.num_clips += taken
            start += taken
            if self._full():
                plans.append(self._close())
        return plans

    def finish(self) -> list[ShardPlan]:
        """The last, partly filled shard, if any."""
        return [self._close()] if self._count else []

    def open_chunks(self) -> set[int]:
        """The chunks whose clips the open (not yet planned) shard holds."""
        return {chunk for chunk, _, _ in self._segments}

    def _room(self, sizes: np.ndarray) -> int:
        """How many of ``sizes`` the open shard takes before it is full (all if never)."""
        count = self._count + np.arange(1, sizes.size + 1)
        payload = self._payload + np.cumsum(sizes)
        full = np.zeros(sizes.size, bool)
        if self.max_clips > 0:
            full |= count >= self.max_clips
        if self.max_bytes > 0:
            full |= payload >= self.max_bytes
        return int(np.argmax(full)) + 1 if full.any() else int(sizes.size)

    def _full(self) -> bool:
        return ((self.max_clips > 0 and self._count >= self.max_clips)
                or (self.max_bytes > 0 and self._payload >= self.max_bytes))

    def _close(self) -> ShardPlan:
        plan = ShardPlan(self.num_shards, self.num_clips - self._count, tuple(self._segments))
        self.num_shards += 1
        self._count, self._payload, self._segments = 0, 0, []
        return plan
