"""A small fixed input for the shard writer's byte-identity tests: synthetic clips with
rejections (a loader error, a clip too short) and colliding keys. Its output digests were
taken with the serial writer of commit 8997bb7 (before the writer went parallel)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dataio.writing.sources.demo import demo_items, synth_loader
from dataio.writing.sources.item import ClipItem


def fixture_items(clips: int = 90) -> list[ClipItem]:
    """``clips`` short demo clips; every 11th fails to load, every 17th is 6 ms long (too
    short), two keys collide (``same``, ``same_1``) and one clip has two labels."""
    items = demo_items(clips, seed=3, min_seconds=0.1, max_seconds=0.4)
    for i, item in enumerate(items):
        item.extra["bad"] = i % 11 == 4
        item.extra["short"] = i % 17 == 9
    items[5].key = items[6].key = items[7].key = "same"
    items[8].key = "same_1"
    items[12].labels = ["bell", "drum"]
    return items


def fixture_loader(item: ClipItem) -> tuple[np.ndarray, int]:
    """:func:`synth_loader`, but failing or too short where the item says so."""
    if item.extra["bad"]:
        raise ValueError("broken on purpose")
    if item.extra["short"]:
        return np.zeros(100, np.float32), 16000
    return synth_loader(item)


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of every file in ``folder``, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
