"""The shard writer's working files, in a folder of its own under the output folder.

- The listing: each listing part's clips as JSON objects laid end to end
  (``items-PPPPP.bin``) with their byte offsets (``items-PPPPP.npy``, int64, one more
  than the clips), so a worker reads the clips of its chunk of the shuffled order by
  listing index without anyone holding the whole listing in memory.
- The spill: per chunk of the shuffled order, its accepted clips encoded
  (``chunk-CCCCC.bin``: per clip, the byte lengths of its key, audio member and JSON
  without index as three little-endian uint32, then the three), kept until the shards
  holding them are written.

Plain records, not pickles: a working folder is data, and reading it runs no code.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dataio.writing.shard_writer import WORK_DIR_NAME
from dataio.writing.sources.item import ClipItem


def write_items(folder: Path, part: int, items: Iterable[ClipItem]) -> int:
    """Store listing part ``part``'s ``items``; returns how many."""
    offsets = [0]
    with open(folder / f"items-{part:05d}.bin", "wb") as out:
        for item in items:
            offsets.append(offsets[-1] + out.write(_item_record(item)))
    np.save(folder / f"items-{part:05d}.npy", np.asarray(offsets, np.int64))
    return len(offsets) - 1


def _item_record(item: ClipItem) -> bytes:
    try:
        return json.dumps(dataclasses.asdict(item), separators=(",", ":")).encode()
    except (TypeError, ValueError) as err:
        raise ValueError(f"clip {item.path}: its labels and extra must be JSON values (strings, numbers, "
                         f"lists, dicts with string keys) for the shard workers: {err}") from None


class ItemStore:
    """Reads stored clips by listing index (part 0's clips first, then part 1's, ...)."""

    def __init__(self, folder: Path, counts: Sequence[int]):
        self.folder = folder
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._parts: dict[int, tuple[np.ndarray, mmap.mmap]] = {}

    def items(self, indices: Sequence[int]) -> list[ClipItem]:
        """The clips at listing ``indices``, in that order."""
        parts = np.searchsorted(self.starts, indices, side="right") - 1
        out = []
        for index, part in zip(np.asarray(indices).tolist(), parts.tolist()):
            offsets, blob = self._part(part)
            row = index - int(self.starts[part])
            out.append(ClipItem(**json.loads(blob[int(offsets[row]):int(offsets[row + 1])])))
        return out

    def _part(self, part: int) -> tuple[np.ndarray, mmap.mmap]:
        if part not in self._parts:
            offsets = np.load(self.folder / f"items-{part:05d}.npy")
            with open(self.folder / f"items-{part:05d}.bin", "rb") as f:
                blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] else b""
            self._parts[part] = offsets, blob
        return self._parts[part]


_LENGTHS = struct.Struct("<III")


def spill_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:05d}.bin"


def write_spill(folder: Path, chunk: int, records: list[tuple[str, bytes, bytes]]) -> None:
    """Keep chunk ``chunk``'s encoded clips ``(key, audio member, JSON without index)``."""
    with open(spill_path(folder, chunk), "wb") as out:
        for key, data, rest in records:
            name = key.encode()
            out.write(_LENGTHS.pack(len(name), len(data), len(rest)))
            out.write(name)
            out.write(data)
            out.write(rest)


def read_spill(folder: Path, chunk: int) -> list[tuple[str, bytes, bytes]]:
    blob, records, at = spill_path(folder, chunk).read_bytes(), [], 0
    while at < len(blob):
        sizes = _LENGTHS.unpack_from(blob, at)
        at += _LENGTHS.size
        name, data, rest = (blob[at:at + sizes[0]], blob[at + sizes[0]:at + sizes[0] + sizes[1]],
                            blob[at + sizes[0] + sizes[1]:at + sum(sizes)])
        records.append((name.decode(), data, rest))
        at += sum(sizes)
    return records


def make_work_dir(out_dir: Path) -> Path:
    """An empty working folder under ``out_dir`` (a stale one, from a killed run, is replaced)."""
    work = out_dir / WORK_DIR_NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work
