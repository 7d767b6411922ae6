"""AudioSet: Google's segment CSVs, the class index and audio downloaded per YouTube id.

``SRC`` holds any of ``balanced_train_segments.csv``, ``unbalanced_train_segments.csv``
and ``eval_segments.csv`` (three ``#`` lines, the last one the header ``YTID,
start_seconds, end_seconds, positive_labels``, then rows such as ``--PJHxphWEs, 30.000,
40.000, "/m/09x0r,/t/dd00088"``) and ``class_labels_indices.csv`` (``index,mid,
display_name``). Labels are display names; the vocabulary is in class-index order.
Balanced and unbalanced rows are split ``train``, eval rows ``test``; the item's
``subset`` is ``balanced_train``, ``unbalanced_train`` or ``eval``.

Audio lives under ``audio_dir`` (default ``SRC/audio``), named by ``audio_pattern``, a
``str.format`` pattern relative to ``audio_dir`` with the fields

- ``{ytid}``: the YouTube id, e.g. ``--PJHxphWEs``;
- ``{subset}``: the CSV's stem, e.g. ``balanced_train_segments``;
- ``{start}``, ``{end}``: the segment bounds in seconds. Plain ``{start}`` is written
  with three decimals as in the CSVs (``30.000``); a format spec applies as to a
  float: ``{start:.0f}`` gives ``30``;
- ``{start_ms}``, ``{end_ms}``: the bounds in whole milliseconds (``30000``).

Without a pattern each clip takes the first of :data:`DEFAULT_AUDIO_PATTERNS` that names
a file on disk. Listed clips whose audio is absent (videos taken down, failed downloads)
are reported in the listing's ``missing``, not written.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dataio.writing.sources.item import ClipItem
from dataio.writing.sources.listing import (
    FileIndex,
    MissingClip,
    SourceListing,
    as_int,
    ordered_vocabulary,
    parse_names,
    table_rows,
)

SUBSET_FILES = {"balanced_train": "balanced_train_segments.csv",
                "unbalanced_train": "unbalanced_train_segments.csv",
                "eval": "eval_segments.csv"}
SUBSET_SPLITS = {"balanced_train": "train", "unbalanced_train": "train", "eval": "test"}
SEGMENT_HEADER = ("YTID", "start_seconds", "end_seconds", "positive_labels")
LABELS_FILE = "class_labels_indices.csv"
LABELS_HEADER = ("index", "mid", "display_name")
PATTERN_FIELDS = ("ytid", "subset", "start", "end", "start_ms", "end_ms")

DEFAULT_AUDIO_PATTERNS = (
    "{ytid}.wav", "{ytid}.flac",  # plain id
    "Y{ytid}.wav", "Y{ytid}.flac",  # "Y" prefix (audioset_tagging_cnn / PANNs): ids may start with "-"
    "{ytid}_{start:.0f}.wav",  # id and whole start second: --PJHxphWEs_30.wav
    "{ytid}_{start}_{end}.wav",  # bounds as in the CSVs: --PJHxphWEs_30.000_40.000.wav
    "Y{ytid}_{start}_{end}.wav",  # DCASE task 4 naming: Y--PJHxphWEs_30.000_40.000.wav
    "{ytid}_{start_ms}_{end_ms}.flac",  # audiosetdl: bounds in ms, --PJHxphWEs_30000_40000.flac
    "{ytid}_{start_ms}_{end_ms}.wav",
    "{subset}/{ytid}.wav", "{subset}/Y{ytid}.wav",  # one folder per CSV
)


class _Seconds(float):
    """A time in seconds that formats like the CSVs ("30.000") unless given a format spec."""

    def __format__(self, spec: str) -> str:
        return format(float(self), spec or ".3f")


@dataclass(frozen=True)
class Segment:
    """One row of a segment CSV; ``where`` ("FILE line N") names it in errors."""

    ytid: str
    start: float
    end: float
    mids: list[str]
    where: str

    def fields(self, subset: str) -> dict[str, object]:
        """The values of the :data:`PATTERN_FIELDS`; ``subset`` is the CSV's stem."""
        return {"ytid": self.ytid, "subset": subset, "start": _Seconds(self.start),
                "end": _Seconds(self.end), "start_ms": round(self.start * 1000),
                "end_ms": round(self.end * 1000)}


def read_class_labels(path: Path) -> tuple[list[str], dict[str, str]]:
    """Display names in class-index order, and the ``mid -> display_name`` map."""
    names: dict[str, str] = {}
    pairs = []
    for where, (index, mid, name) in table_rows(path, LABELS_HEADER):
        pairs.append((as_int(index, where, "index"), name))
        names[mid] = name
    return ordered_vocabulary(pairs, str(path)), names


def _seconds(text: str, where: str, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {column} {text!r} is not a number of seconds") from None


def read_segments(path: Path) -> Iterator[Segment]:
    """The rows of one segment CSV (three ``#`` lines, the last one the header)."""
    for where, (ytid, start, end, labels) in table_rows(path, SEGMENT_HEADER, comment="#"):
        mids = [mid.strip() for mid in labels.split(",") if mid.strip()]
        if not ytid or not mids:
            raise ValueError(f"{where}: empty YTID or positive_labels")
        yield Segment(ytid, _seconds(start, where, "start_seconds"),
                      _seconds(end, where, "end_seconds"), mids, where)


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """``patterns`` if each formats with the :data:`PATTERN_FIELDS` and names ``{ytid}``."""
    checked = []
    sample = Segment("YTID", 30.0, 40.0, [], "").fields("balanced_train_segments")
    for pattern in patterns:
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(pattern) if name}
            pattern.format(**sample)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"audio_pattern {pattern!r} does not format ({err!r}); its fields "
                             f"may be {', '.join('{' + f + '}' for f in PATTERN_FIELDS)}") from None
        if "ytid" not in used:
            raise ValueError(f"audio_pattern {pattern!r} must contain {{ytid}}")
        checked.append(pattern)
    return checked


def _chosen_subsets(src: Path, subsets: str | Iterable[str] | None) -> list[str]:
    """The subsets to read: those asked for (each CSV must exist), else every CSV present."""
    if subsets is None:
        chosen = [name for name, file in SUBSET_FILES.items() if (src / file).is_file()]
        if not chosen:
            raise ValueError(f"layout audioset: no segment CSV in {src} (expected any of "
                             f"{', '.join(SUBSET_FILES.values())})")
        return chosen
    chosen = parse_names(subsets, list(SUBSET_FILES), "subsets")
    for name in chosen:
        if not (src / SUBSET_FILES[name]).is_file():
            raise ValueError(f"layout audioset: subset {name} asked for but "
                             f"{src / SUBSET_FILES[name]} does not exist")
    return chosen


def find_audio(fields: dict[str, object], audio_dir: Path, patterns: list[str],
               files: FileIndex) -> Path | None:
    """The first file named by one of ``patterns`` (relative to ``audio_dir``) that exists."""
    root = os.fspath(audio_dir)
    for pattern in patterns:
        path = os.path.join(root, pattern.format(**fields))
        if files.exists(path):
            return Path(path)
    return None


def _display_names(segment: Segment, names: dict[str, str]) -> list[str]:
    labels = []
    for mid in segment.mids:
        if mid not in names:
            raise ValueError(f"{segment.where}: label id {mid!r} is not in {LABELS_FILE}")
        labels.append(names[mid])
    return list(dict.fromkeys(labels))


def audioset_items(src: Path, *, subsets: str | Iterable[str] | None = None,
                   audio_dir: str | Path | None = None,
                   audio_pattern: str | None = None) -> SourceListing:
    """The AudioSet clips of ``src`` whose audio is on disk; the others in ``missing``.

    ``subsets``: which CSVs to read (``"balanced_train,eval"``; default every one present);
    ``audio_dir``: the audio folder (default ``src/audio``); ``audio_pattern``: the file
    name pattern (default: try :data:`DEFAULT_AUDIO_PATTERNS` per clip).
    """
    src = Path(src)
    vocabulary, names = read_class_labels(src / LABELS_FILE)
    chosen = _chosen_subsets(src, subsets)
    patterns = check_patterns([audio_pattern] if audio_pattern else DEFAULT_AUDIO_PATTERNS)
    root = Path(audio_dir) if audio_dir is not None else src / "audio"
    files = FileIndex()
    items: list[ClipItem] = []
    missing: list[MissingClip] = []
    for subset in chosen:
        csv_path = src / SUBSET_FILES[subset]
        for segment in read_segments(csv_path):
            labels = _display_names(segment, names)
            path = find_audio(segment.fields(csv_path.stem), root, patterns, files)
            if path is None:
                missing.append(MissingClip(segment.ytid, csv_path.name))
                continue
            items.append(ClipItem(path=str(path), labels=labels, split=SUBSET_SPLITS[subset],
                                  key=f"Y{segment.ytid}", subset=subset))
    return SourceListing(items, missing, vocabulary, id_column="ytid")
