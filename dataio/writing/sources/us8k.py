"""UrbanSound8K as its authors ship it: ten fold folders and one metadata CSV.

``SRC`` holds ``audio/fold1`` .. ``audio/fold10`` with the slices and
``metadata/UrbanSound8K.csv`` (``slice_file_name,fsID,start,end,salience,fold,classID,
class``). Label = ``class``; the ten folds are kept (the official protocol is 10-fold
cross-validation) and every clip is split ``train``. The vocabulary follows ``classID``.
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

META_FILE = "metadata/UrbanSound8K.csv"
HEADER = ("slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class")


def us8k_items(src: Path) -> SourceListing:
    """The UrbanSound8K clips of ``src`` whose audio is on disk, with their folds."""
    src = Path(src)
    csv_path = src / META_FILE
    files = FileIndex()
    items: list[ClipItem] = []
    missing: list[MissingClip] = []
    classes: list[tuple[int, str]] = []
    for where, cells in table_rows(csv_path, HEADER):
        name, fold, class_id, label = cells[0], as_int(cells[5], where, "fold"), cells[6], cells[7]
        classes.append((as_int(class_id, where, "classID"), label))
        path = src / "audio" / f"fold{fold}" / name
        if not files.exists(path):
            missing.append(MissingClip(name, csv_path.name))
            continue
        items.append(ClipItem(path=str(path), labels=[label], fold=fold, key=Path(name).stem))
    return SourceListing(items, missing, ordered_vocabulary(classes, str(csv_path)),
                         id_column="slice_file_name")
