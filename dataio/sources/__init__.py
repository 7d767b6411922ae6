"""Converters from a dataset's own layout to a list of :class:`~dataio.shard_writer.ClipItem`.

``LAYOUTS`` maps a layout name (``audioclr shard --layout NAME``) to a function
``(src: Path, **opts) -> list[ClipItem]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dataio.shard_writer import ClipItem
from dataio.sources.folder import csv_items, folder_items

LAYOUTS: dict[str, Callable[..., list[ClipItem]]] = {
    "folder": folder_items,
    "csv": csv_items,
}


def items_for_layout(name: str, src: Path, **opts) -> list[ClipItem]:
    """The clips of ``src`` read with layout ``name``; an unknown name lists the valid ones."""
    try:
        convert = LAYOUTS[name]
    except KeyError:
        valid = ", ".join(sorted(LAYOUTS))
        raise ValueError(f"unknown layout {name!r}; valid layouts: {valid}") from None
    return convert(Path(src), **opts)
