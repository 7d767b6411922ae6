"""What a dataset converter returns, and the helpers the converters share.

A converter reads a dataset's own metadata and returns a :class:`SourceListing`: the
clips whose audio is on disk, the listed clips whose audio is not (``audioclr shard``
counts them and writes them to ``missing.tsv``; they are never dropped silently) and,
where the dataset defines one, the official order of its labels.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dataio.atomic import write_text_atomically
from dataio.writing.sources.item import ClipItem

MISSING_NAME = "missing.tsv"


@dataclass(frozen=True)
class MissingClip:
    """A clip the metadata lists but whose audio file is not on disk."""

    clip: str  # the dataset's own id of the clip: a YTID, an fname, a file name
    listed_in: str  # the metadata file that lists it, e.g. "eval_segments.csv"


@dataclass
class SourceListing:
    """A converter's answer.

    ``items``: the clips to write; ``missing``: listed clips without audio;
    ``vocabulary``: the dataset's official label order (None: sorted label names);
    ``id_column``: what the dataset calls a clip id (the first column of ``missing.tsv``);
    ``fold_names``: where the folds were named, fold number -> name (the items carry the
    numbers; ``audioclr shard`` keeps the names in the manifest).
    """

    items: list[ClipItem]
    missing: list[MissingClip] = field(default_factory=list)
    vocabulary: list[str] | None = None
    id_column: str = "clip"
    fold_names: dict[int, str] = field(default_factory=dict)


def write_missing(listing: SourceListing, folder: Path) -> Path:
    """Write ``folder/missing.tsv`` (``<id_column><TAB>csv`` then one row per missing clip)."""
    path = Path(folder) / MISSING_NAME
    rows = "".join(f"{m.clip}\t{m.listed_in}\n" for m in listing.missing)
    return write_text_atomically(path, f"{listing.id_column}\tcsv\n{rows}")


class FileIndex:
    """Answers "is this file on disk?" with one directory listing per folder.

    AudioSet lists two million clips and several naming conventions are tried per clip;
    a set lookup per try (on plain strings: ``Path`` objects cost more than the lookup)
    keeps that cheap where a ``stat`` per try would not be.
    """

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def exists(self, path: str | Path) -> bool:
        folder, name = os.path.split(os.fspath(path))
        names = self._names.get(folder)
        if names is None:
            try:
                with os.scandir(folder or ".") as entries:
                    names = frozenset(e.name for e in entries if e.is_file())
            except OSError:  # no such folder (or not a folder): nothing in it exists
                names = frozenset()
            self._names[folder] = names
        return name in names


def parse_names(value: str | Iterable[str], valid: Sequence[str], option: str) -> list[str]:
    """``value`` ("a,b" or ["a", "b"]) as a list of names, each one of ``valid``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise ValueError(f"{option}: {', '.join(unknown) or 'nothing'} given; choose from "
                         f"{', '.join(valid)} (comma-separated)")
    return list(dict.fromkeys(names))


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of the non-blank rows of CSV ``path``."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, skipinitialspace=True)  # AudioSet writes ", " between cells
        for row in reader:
            if any(cell.strip() for cell in row):
                yield reader.line_num, [cell.strip() for cell in row]


def _split_header(rows: Iterator[tuple[int, list[str]]],
                  comment: str | None) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and the data rows; with ``comment`` the header is the last leading comment line."""
    if comment is None:
        first = next(rows, None)
        return (first[1] if first else []), rows
    header: list[str] = []
    for line, row in rows:
        if not row[0].startswith(comment):
            return header, itertools.chain([(line, row)], rows)
        header = [row[0][len(comment):].strip(), *row[1:]]
    return header, iter(())


def table_rows(path: Path, header: Sequence[str], *,
               comment: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """``(where, cells)`` of each data row of CSV ``path``, whose header must be ``header``.

    ``where`` ("FILE line N") names the row in errors; cells are stripped; blank lines are
    skipped. With ``comment`` (AudioSet: ``"#"``) the file opens with comment lines and
    the last of them is the header. A wrong header or a row of the wrong width raises
    ValueError naming the file.
    """
    path = Path(path)
    expected = ",".join(header)
    if not path.is_file():
        raise ValueError(f"{path} not found (a CSV file with the header {expected})")
    found, rows = _split_header(_rows(path), comment)
    if found != list(header):
        raise ValueError(f"{path}: expected the header {expected!r}, found {','.join(found)!r}")
    for line, cells in rows:
        where = f"{path} line {line}"
        if len(cells) != len(header):
            raise ValueError(f"{where}: expected {len(header)} columns ({expected}), "
                             f"got {len(cells)}: {cells}")
        yield where, cells


def headerless_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """``(where, cells)`` of each row of a CSV without header whose first column is an integer."""
    path = Path(path)
    expected = ",".join(columns)
    if not path.is_file():
        raise ValueError(f"{path} not found (a CSV file of rows {expected}, no header)")
    for line, cells in _rows(path):
        where = f"{path} line {line}"
        if len(cells) != len(columns) or not cells[0].isdigit():
            raise ValueError(f"{where}: expected rows {expected} with an integer "
                             f"{columns[0]} and no header line, got {cells}")
        yield where, cells


def as_int(text: str, where: str, column: str) -> int:
    """``text`` as an int, or a ValueError naming the row and column."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{where}: {column} {text!r} is not an integer") from None


def ordered_vocabulary(pairs: Iterable[tuple[int, str]], source: str) -> list[str]:
    """Label names sorted by their official index; an index naming two labels is an error."""
    by_index: dict[int, str] = {}
    for index, name in pairs:
        if by_index.setdefault(index, name) != name:
            raise ValueError(f"{source}: index {index} names both {by_index[index]!r} and {name!r}")
    names = [by_index[i] for i in sorted(by_index)]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: a label name appears under two indices")
    return names
