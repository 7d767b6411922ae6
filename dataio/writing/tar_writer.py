"""Shards written: the samples of a corpus into numbered WebDataset tars, each with its
DALI index, in bytes that depend on nothing but the samples (no owners, times or modes
of this machine). The reading side is :mod:`dataio.reading.tar_reader`; what goes into the
samples is :mod:`dataio.writing.shard_writer` (from audio files) or :mod:`dataio.writing.convert` (from
another corpus).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dataio.atomic import write_text_atomically
from dataio.reading.manifest import ShardInfo

DALI_INDEX_VERSION = "v1.2"
_TAR_BLOCK = 512


class ShardSink:
    """Writes samples into numbered tars (under a ``.tmp`` name until complete) and DALI indexes."""

    def __init__(self, out_dir: Path, max_clips: int, max_bytes: int, on_shard=None, first: int = 0):
        self.out_dir, self.max_clips, self.max_bytes = out_dir, max_clips, max_bytes
        self.on_shard = on_shard  # called with (tar, index) once both are complete
        self.first = first  # the number of the first shard written
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._index_lines: list[str] = []
        self._payload = 0  # bytes of member data in the open shard

    @property
    def _open_path(self) -> Path:
        return self.out_dir / f"shard-{self.first + len(self.shards):05d}.tar.tmp"

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample (``[(extension, data), ...]``); cut the shard when it is full. An
        OSError (a full disk) names the shard it was writing."""
        with _naming(self._open_path):
            self._add(key, members)

    def _add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._tar = tarfile.open(self._open_path, "w", format=tarfile.USTAR_FORMAT)
        components = []
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")  # uid, gid 0 and no user names by default
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # the same bytes every run
            self._tar.addfile(info, io.BytesIO(data))
            # the member's data ends, padded to whole blocks, where the tar now stands
            offset = self._tar.offset - -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
            components.append(f"{ext} {offset} {len(data)} {key}.{ext}")
            self._payload += len(data)
        self._index_lines.append(" ".join(components))
        full_count = self.max_clips > 0 and len(self._index_lines) >= self.max_clips
        if full_count or (self.max_bytes > 0 and self._payload >= self.max_bytes):
            self.close()

    def close(self) -> None:
        """Finish the open shard, if any: rename the tar, then write its index."""
        if self._tar is None:
            return
        with _naming(self._open_path):
            self._tar.close()
        stem = f"shard-{self.first + len(self.shards):05d}"
        tar_path = self.out_dir / f"{stem}.tar"
        (self.out_dir / f"{stem}.tar.tmp").replace(tar_path)
        write_dali_index(self.out_dir / f"{stem}.idx", self._index_lines)
        self.shards.append(ShardInfo(url=tar_path.name, count=len(self._index_lines),
                                     bytes=tar_path.stat().st_size, index_file=f"{stem}.idx"))
        self._tar, self._index_lines, self._payload = None, [], 0
        if self.on_shard is not None:
            self.on_shard(tar_path, self.out_dir / f"{stem}.idx")


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised inside without a file name (a write to an open file: ENOSPC) gets
    ``path``, so the message says where the disk filled up."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def write_dali_index(path: Path, sample_lines: list[str]) -> None:
    """Write a DALI webdataset index in format ``v1.2``, atomically.

    This is the format NVIDIA DALI's ``tools/wds2idx.py`` writes and
    ``fn.readers.webdataset(index_paths=...)`` parses (``ParseIndexFile`` in
    ``dali/operators/reader/loader/webdataset_loader.cc``; DALI reads ``v1.1`` and
    ``v1.2``): a first line ``v1.2 <num_samples>``, then one line per sample with, for
    each of its members, ``<ext> <offset> <size> <member name>``; ``offset`` is the byte
    position of the member's data (past its header, a multiple of 512) and ``size`` its
    length in bytes. ``sample_lines`` are those per-sample lines.
    """
    write_text_atomically(path, f"{DALI_INDEX_VERSION} {len(sample_lines)}\n"
                      + "".join(line + "\n" for line in sample_lines))
