"""FSD50K as Zenodo ships it: two audio folders and the ground-truth CSVs.

``SRC`` holds ``FSD50K.dev_audio/<fname>.wav``, ``FSD50K.eval_audio/<fname>.wav`` and
``FSD50K.ground_truth/`` with ``dev.csv`` (``fname,labels,mids,split``; split ``train``
or ``val``), ``eval.csv`` (``fname,labels,mids``) and ``vocabulary.csv`` (no header:
``index,label,mid``). Labels are the comma-separated names of the ``labels`` column
(several per clip); dev rows keep their split, eval rows are ``test``; the vocabulary
follows ``vocabulary.csv``.
"""

from __future__ import annotations

from pathlib import Path

from dataio.writing.sources.item import ClipItem
from dataio.writing.sources.listing import (
    FileIndex,
    MissingClip,
    SourceListing,
    as_int,
    headerless_rows,
    ordered_vocabulary,
    table_rows,
)

TRUTH_DIR = "FSD50K.ground_truth"
DEV_HEADER = ("fname", "labels", "mids", "split")
EVAL_HEADER = ("fname", "labels", "mids")
DEV_SPLITS = ("train", "val")


def read_vocabulary(path: Path) -> list[str]:
    """Label names of ``vocabulary.csv`` (rows ``index,label,mid``, no header) in index order."""
    pairs = [(as_int(index, where, "index"), label)
             for where, (index, label, _) in headerless_rows(path, ("index", "label", "mid"))]
    return ordered_vocabulary(pairs, str(path))


def _labels(text: str, where: str, known: set[str]) -> list[str]:
    labels = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [x for x in labels if x not in known]
    if unknown or not labels:
        raise ValueError(f"{where}: labels {unknown or text!r} are not in {TRUTH_DIR}/vocabulary.csv")
    return labels


def _part_items(src: Path, part: str, known: set[str], files: FileIndex,
                missing: list[MissingClip]) -> list[ClipItem]:
    """The clips of ``dev`` or ``eval``; listed clips without audio go to ``missing``."""
    csv_path = src / TRUTH_DIR / f"{part}.csv"
    audio_dir = src / f"FSD50K.{part}_audio"
    items = []
    for where, cells in table_rows(csv_path, DEV_HEADER if part == "dev" else EVAL_HEADER):
        fname, labels = cells[0], _labels(cells[1], where, known)
        split = cells[3] if part == "dev" else "test"
        if part == "dev" and split not in DEV_SPLITS:
            raise ValueError(f"{where}: split {split!r} is not one of {', '.join(DEV_SPLITS)}")
        path = audio_dir / f"{fname}.wav"
        if not files.exists(path):
            missing.append(MissingClip(fname, csv_path.name))
            continue
        items.append(ClipItem(path=str(path), labels=labels, split=split, key=f"{part}_{fname}"))
    return items


def fsd50k_items(src: Path) -> SourceListing:
    """Every FSD50K clip of ``src`` (dev then eval) whose audio is on disk."""
    src = Path(src)
    vocabulary = read_vocabulary(src / TRUTH_DIR / "vocabulary.csv")
    files, missing = FileIndex(), []
    items = [item for part in ("dev", "eval")
             for item in _part_items(src, part, set(vocabulary), files, missing)]
    return SourceListing(items, missing, vocabulary, id_column="fname")
