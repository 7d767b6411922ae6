"""ESC-50 (and its ESC-10 subset) as its GitHub repository ships it.

``SRC`` holds ``audio/<filename>`` (``1-100032-A-0.wav``) and ``meta/esc50.csv``
(``filename,fold,target,category,esc10,src_file,take``). Label = ``category``; the five
folds are kept for cross-validation and every clip is split ``train``. The vocabulary
follows ``target`` (0 = dog, 1 = rooster, ...), restricted to the categories written.
"""

from __future__ import annotations

from pathlib import Path

from dataio.writing.sources.item import ClipItem
from dataio.writing.sources.listing import (
    FileIndex,
    MissingClip,
    SourceListing,
    as_int,
    ordered_vocabulary,
    table_rows,
)

META_FILE = "meta/esc50.csv"
HEADER = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def _true_or_false(text: str, where: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(f"{where}: esc10 {text!r} is not True or False")
    return text == "True"


def esc50_items(src: Path, *, esc10: bool = False) -> SourceListing:
    """The ESC-50 clips of ``src`` whose audio is on disk; ``esc10``: only the ESC-10 ones."""
    src = Path(src)
    csv_path = src / META_FILE
    files = FileIndex()
    items: list[ClipItem] = []
    missing: list[MissingClip] = []
    targets: list[tuple[int, str]] = []
    for where, (filename, fold, target, category, in_esc10, _, _) in table_rows(csv_path, HEADER):
        if not _true_or_false(in_esc10, where) and esc10:
            continue
        targets.append((as_int(target, where, "target"), category))
        path = src / "audio" / filename
        if not files.exists(path):
            missing.append(MissingClip(filename, csv_path.name))
            continue
        items.append(ClipItem(path=str(path), labels=[category],
                              fold=as_int(fold, where, "fold"), key=Path(filename).stem))
    return SourceListing(items, missing, ordered_vocabulary(targets, str(csv_path)),
                         id_column="filename")
