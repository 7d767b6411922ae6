"""Clip lists for two generic layouts: a folder per label, or a CSV of ``path,label[,fold]``
(folds integers or names)."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

from dataio.writing.sources.item import ClipItem, safe_key
from dataio.writing.sources.listing import SourceListing

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"})


def _relative_key(relative: str) -> str:
    """Tar key of a file from its path relative to the dataset root ("dog/a.wav" -> "dog_a_wav")."""
    return safe_key(relative.replace("\\", "/").replace("/", "_").replace(".", "_"))


def _is_audio(path: Path) -> bool:
    hidden = path.name.startswith(".")
    return path.is_file() and path.suffix.lower() in AUDIO_EXTENSIONS and not hidden


def folder_items(src: Path) -> list[ClipItem]:
    """One item per audio file under ``src/LABEL/`` (searched recursively), sorted by path.

    Each sub-folder of ``src`` is a label; files directly in ``src``, hidden files and
    files soundfile does not read (by extension) are ignored.
    """
    return [item for part in folder_parts(src) for item in part()]


def folder_parts(src: Path) -> list[functools.partial]:
    """:func:`folder_items` in parts, one per label folder (in sorted order), each a
    callable that lists its folder: the shard writer's workers list them in parallel."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"layout folder: {src} is not a folder (one sub-folder per label)")
    labels = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [functools.partial(label_folder_items, src, label) for label in labels]


def label_folder_items(src: Path, label: str) -> list[ClipItem]:
    """The items of one label folder ``src/label``, sorted by path."""
    items = []
    for path in sorted(p for p in (src / label).rglob("*") if _is_audio(p)):
        relative = path.relative_to(src).as_posix()
        items.append(ClipItem(path=str(path), labels=[label], key=_relative_key(relative)))
    return items


def _header_columns(row: list[str]) -> dict[str, int] | None:
    """Column positions if ``row`` is a header naming at least ``path`` and ``label``.

    The ``"width"`` entry is the header's number of columns, the most a row may have.
    """
    names = [cell.strip().lower() for cell in row]
    if "path" not in names or "label" not in names:
        return None
    columns = {name: names.index(name) for name in ("path", "label", "fold") if name in names}
    return columns | {"width": len(names)}


def _row_item(row: list[str], columns: dict[str, int], root: Path, where: str) -> tuple[ClipItem, str]:
    """The item of one CSV row (its fold not yet set) and the row's fold cell ("" if none);
    ``where`` ("file.csv line 7") names the row in errors."""
    needed = max(columns["path"], columns["label"]) + 1
    if not needed <= len(row) <= columns["width"]:
        raise ValueError(f"{where}: expected columns path,label[,fold] but got {len(row)}: {row}")
    cells = [cell.strip() for cell in row]
    path, label = cells[columns["path"]], cells[columns["label"]]
    if not path or not label:
        raise ValueError(f"{where}: empty path or label in {row}")
    fold_at = columns.get("fold", len(cells))
    fold_text = cells[fold_at] if fold_at < len(cells) else ""
    full = Path(path) if Path(path).is_absolute() else root / path
    return ClipItem(path=str(full), labels=[label], key=_relative_key(path)), fold_text


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def number_folds(cells: list[tuple[str, str]]) -> tuple[list[int | None], dict[int, str]]:
    """Each row's fold from its ``(where, fold cell)``, and the fold names.

    Integer folds are kept as they are (no names). Named folds (kits, speakers, sites) are
    numbered 1..N in sorted name order, so the numbers do not depend on the rows' order,
    and returned as {number: name}. A blank cell is no fold. A column that mixes integers
    and names is refused (a typo such as ``1O`` among ``1..10`` would otherwise renumber
    every fold silently); the error names a row of each kind.
    """
    named = [(where, text) for where, text in cells if text and not _is_integer(text)]
    if not named:
        return [int(text) if text else None for _, text in cells], {}
    numbered = [(where, text) for where, text in cells if text and _is_integer(text)]
    if numbered:
        (where, name), (other, number) = named[0], numbered[0]
        raise ValueError(f"{where}: fold {name!r} is a name, but {other} has the integer fold {number}; "
                         f"the fold column must hold only integers or only names (e.g. kit{number})")
    fold_names = dict(enumerate(sorted({text for _, text in named}), start=1))
    number_of = {name: number for number, name in fold_names.items()}
    return [number_of[text] if text else None for _, text in cells], fold_names


def csv_items(csv_path: Path) -> SourceListing:
    """One item per row of ``csv_path`` with columns ``path,label[,fold]``.

    A first row naming ``path`` and ``label`` (and maybe ``fold``) is a header, and then
    gives the column order; relative paths are relative to the CSV's folder. Blank lines
    are skipped; a malformed row raises ValueError naming the CSV line. Folds are integers
    or names, numbered as :func:`number_folds` says (the listing's ``fold_names``).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"layout csv: {csv_path} is not a CSV file (columns path,label[,fold])")
    items: list[ClipItem] = []
    folds: list[tuple[str, str]] = []
    columns: dict[str, int] | None = None
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                columns = _header_columns(row)
                if columns is not None:
                    continue
                columns = {"path": 0, "label": 1, "fold": 2, "width": 3}
            where = f"{csv_path} line {reader.line_num}"
            item, fold_text = _row_item(row, columns, csv_path.parent, where)
            items.append(item)
            folds.append((where, fold_text))
    numbers, fold_names = number_folds(folds)
    for item, number in zip(items, numbers):
        item.fold = number
    return SourceListing(items, fold_names=fold_names)
