"""Samples of a local tar shard, read from a memory map.

webdataset's reader walks a tar through Python's ``tarfile`` (about 200 us per sample
here, whatever the member's size), which is more than reading a view of a pcm16 or
logmel member costs (tens of microseconds). This reader parses the 512-byte headers
itself and hands out members as memoryviews of the map: only the pages a view touches
are read, and nothing is copied but the small JSON. It groups members into samples as
webdataset does (key = the name up to the first dot of its last part; a sample ends
when the key changes or a member's extension repeats). ustar, GNU long names and pax
``path`` records are understood; a header that fails its checksum or a member cut short
is an error for the caller's handler, and the rest of the shard is left behind. Shards
behind a URL are streamed by webdataset (:func:`dataio.reading.remote.tar_samples`).
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from dataio.errors import TarFormatError

BLOCK = 512
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _number(field: bytes, where: str) -> int:
    """A header's octal number field (or GNU base-256, for sizes of 8 GiB and more)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise TarFormatError(f"{where}: bad number {field!r} in a tar header (damaged shard?)") from None


def _pax_path(data: memoryview) -> str | None:
    """The ``path`` record of a pax extended header, if it has one."""
    text = bytes(data).decode("utf-8", "surrogateescape")
    pos = 0
    while pos < len(text):
        length = int(text[pos:text.index(" ", pos)])
        key, _, value = text[text.index(" ", pos) + 1:pos + length - 1].partition("=")
        if key == "path":
            return value
        pos += length
    return None


def members(path: str | Path) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of each regular file in the tar at ``path``, in order."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise TarFormatError(f"{path}: empty file (0 bytes; truncated shard?)")
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    size, pos, long_name = len(view), 0, None
    while pos + BLOCK <= size:
        header = view[pos:pos + BLOCK].tobytes()
        if not any(header):
            return  # the end-of-archive blocks
        where = f"{path} at byte {pos}"
        if _number(header[148:156], where) != sum(header) - sum(header[148:156]) + 256:
            raise TarFormatError(f"{where}: tar header checksum does not match (damaged shard?)")
        length, kind = _number(header[124:136], where), header[156:157]
        start = pos + BLOCK
        if start + length > size:
            raise TarFormatError(f"{where}: member of {length} bytes cut short at byte {size} (truncated shard?)")
        data = view[start:start + length]
        pos = start + -(-length // BLOCK) * BLOCK
        if kind == b"L":  # GNU long name: the next member's name
            long_name = bytes(data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header: may carry the next member's path
            long_name = _pax_path(data) or long_name
            continue
        if kind not in (b"0", b"\0", b"7"):  # folders, links, global headers: not members
            long_name = None
            continue
        name = long_name or _name(header)
        long_name = None
        yield name, data
    # every tar writer ends an archive with zero blocks: a file that stops before them was cut
    raise TarFormatError(f"{path}: ends at byte {size} without the end-of-archive blocks (truncated shard?)")


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and header[345]:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def local_tar_samples(path: str | Path, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset-style samples ({'__key__', '__url__', ext: data, ...}) of a local tar;
    ``data`` is a memoryview, except ``json`` members (bytes). A read error goes to
    ``handler``: True leaves the rest of the shard behind, False raises it."""
    current: dict | None = None
    try:
        for name, data in members(path):
            match = _KEY_EXT.match(name)
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is not None and (current["__key__"] != key or ext in current):
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": str(path)}
            current[ext] = bytes(data) if ext == "json" else data
    except (OSError, ValueError) as err:
        if current is not None:  # read whole before the damage (a part missing is a counted skip)
            yield current
        if not handler(err):
            raise
        return
    if current is not None:
        yield current
