"""FSDnoisy18k as Zenodo ships it, keeping its clean and noisy subsets apart.

``SRC`` holds ``FSDnoisy18k.audio_train/<fname>``, ``FSDnoisy18k.audio_test/<fname>``
and ``FSDnoisy18k.meta/`` with ``train.csv`` (``fname,label,aso_id,manually_verified,
noisy_small``) and ``test.csv`` (``fname,label,aso_id``). One label per clip.

Each item's ``subset`` says where it comes from: ``clean`` (train, manually_verified=1),
``noisy_small`` (train, noisy_small=1 and not verified), ``noisy`` (the rest of train)
or ``test``. Train rows are split ``train``, test rows ``test``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dataio.writing.sources.item import ClipItem
from dataio.writing.sources.listing import FileIndex, MissingClip, SourceListing, parse_names, table_rows

META_DIR = "FSDnoisy18k.meta"
TRAIN_HEADER = ("fname", "label", "aso_id", "manually_verified", "noisy_small")
TEST_HEADER = ("fname", "label", "aso_id")
TRAIN_SUBSETS = ("clean", "noisy_small", "noisy")


def _flag(text: str, where: str, column: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"{where}: {column} {text!r} is not 0 or 1")
    return text == "1"


def train_subset(manually_verified: str, noisy_small: str, where: str) -> str:
    """``clean``, ``noisy_small`` or ``noisy`` from a train row's two flags ("0"/"1")."""
    if _flag(manually_verified, where, "manually_verified"):
        return "clean"
    return "noisy_small" if _flag(noisy_small, where, "noisy_small") else "noisy"


def _part_items(src: Path, part: str, keep: set[str], files: FileIndex,
                missing: list[MissingClip]) -> list[ClipItem]:
    """The clips of ``train`` (those of the ``keep`` subsets) or ``test``."""
    csv_path = src / META_DIR / f"{part}.csv"
    audio_dir = src / f"FSDnoisy18k.audio_{part}"
    items = []
    for where, cells in table_rows(csv_path, TRAIN_HEADER if part == "train" else TEST_HEADER):
        fname, label = cells[0], cells[1]
        subset = train_subset(cells[3], cells[4], where) if part == "train" else "test"
        if not fname or not label:
            raise ValueError(f"{where}: empty fname or label")
        if subset not in keep:
            continue
        path = audio_dir / fname
        if not files.exists(path):
            missing.append(MissingClip(fname, csv_path.name))
            continue
        items.append(ClipItem(path=str(path), labels=[label], split=part,
                              key=f"{part}_{Path(fname).stem}", subset=subset))
    return items


def fsdnoisy18k_items(src: Path, *, subsets: str | Iterable[str] | None = None) -> SourceListing:
    """The FSDnoisy18k clips of ``src`` whose audio is on disk (train, then test).

    ``subsets``: the train subsets to keep, e.g. ``"clean,noisy_small"`` (default all
    three); test clips are always kept.
    """
    src = Path(src)
    chosen = list(TRAIN_SUBSETS) if subsets is None else parse_names(
        subsets, TRAIN_SUBSETS, "subsets (test clips are always written)")
    files, missing = FileIndex(), []
    items = _part_items(src, "train", set(chosen), files, missing)
    items += _part_items(src, "test", {"test"}, files, missing)
    return SourceListing(items, missing, id_column="fname")
