"""GTZAN genres: one folder per genre, with a seeded, stratified train/val/test split.

``SRC`` holds ``genres/<genre>/<genre>.000NN.wav``; the Kaggle copy's
``genres_original/``, ``SRC`` being the genres folder itself and the original archive's
``.au`` files work too. Label = the genre folder.

GTZAN has no official split: each genre's clips are shuffled with a generator seeded by
``(split_seed, genre)`` and cut 70/15/15 into train/val/test, so the split depends only
on ``split_seed`` and that genre's files (not on other genres, nor on the shard order
seed). GTZAN lists no files, so nothing is reported missing; its one unreadable clip
(``jazz.00054``) is rejected by the shard writer with its reason.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from dataio.writing.sources.folder import AUDIO_EXTENSIONS
from dataio.writing.sources.item import ClipItem
from dataio.writing.sources.listing import SourceListing

GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop",
          "reggae", "rock")
GENRE_FOLDERS = ("genres", "genres_original", ".")  # ".": SRC is the genres folder
VAL_SHARE, TEST_SHARE = 0.15, 0.15  # train gets the rest: 70 %
_EXTENSIONS = AUDIO_EXTENSIONS | {".au"}


def genre_root(src: Path) -> Path:
    """The folder of ``src`` that holds the genre folders."""
    for name in GENRE_FOLDERS:
        if any((src / name / genre).is_dir() for genre in GENRES):
            return src / name
    raise ValueError(f"layout gtzan: no genre folders ({', '.join(GENRES)}) under "
                     f"{' or '.join(str(src / name) for name in GENRE_FOLDERS)}")


def split_counts(n: int) -> dict[str, int]:
    """How many of a genre's ``n`` clips go to each split (15 % val, 15 % test, rounded)."""
    val, test = round(n * VAL_SHARE), round(n * TEST_SHARE)
    return {"train": n - val - test, "val": val, "test": test}


def stratum_splits(n: int, genre: str, split_seed: int) -> list[str]:
    """The split of each of a genre's ``n`` clips (in file-name order), seeded and shuffled."""
    if split_seed < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    labels = [split for split, count in split_counts(n).items() for _ in range(count)]
    order = np.random.default_rng([split_seed, zlib.crc32(genre.encode())]).permutation(n)
    splits = [""] * n
    for position, clip in enumerate(order.tolist()):
        splits[clip] = labels[position]
    return splits


def gtzan_items(src: Path, *, split_seed: int = 0) -> SourceListing:
    """Every GTZAN clip of ``src``, genre by genre in file-name order, with its split."""
    root = genre_root(Path(src))
    items: list[ClipItem] = []
    for genre in GENRES:
        paths = sorted(p for p in (root / genre).glob("*")
                       if p.is_file() and p.suffix.lower() in _EXTENSIONS
                       and not p.name.startswith("."))
        for path, split in zip(paths, stratum_splits(len(paths), genre, split_seed)):
            items.append(ClipItem(path=str(path), labels=[genre], split=split,
                                  key=path.stem.replace(".", "_")))
    return SourceListing(items)
