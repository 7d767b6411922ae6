"""Converters from a dataset's own layout to the clips the shard writer takes.

``LAYOUTS`` maps a layout name (``audioclr shard --layout NAME``) to a function
``(src: Path, **opts)``. The dataset converters and ``csv`` return a
:class:`~dataio.writing.sources.listing.SourceListing` (clips on disk, listed clips missing on
disk, official vocabulary, fold names); the generic ``folder`` one returns a plain
``list[ClipItem]``. :func:`load_layout` gives a ``SourceListing`` either way. A
converter's keyword options are its layout's options (:func:`layout_options`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

from dataio.writing.sources.audioset import audioset_items
from dataio.writing.sources.esc50 import esc50_items
from dataio.writing.sources.folder import csv_items, folder_items, folder_parts
from dataio.writing.sources.fsd50k import fsd50k_items
from dataio.writing.sources.fsdnoisy18k import fsdnoisy18k_items
from dataio.writing.sources.gtzan import gtzan_items
from dataio.writing.sources.item import ClipItem
from dataio.writing.sources.listing import MissingClip, SourceListing, write_missing
from dataio.writing.sources.us8k import us8k_items

__all__ = ["LAYOUTS", "MissingClip", "SourceListing", "items_for_layout", "layout_options",
           "listing_parts", "load_layout", "write_missing"]

LAYOUTS: dict[str, Callable[..., list[ClipItem] | SourceListing]] = {
    "folder": folder_items,
    "csv": csv_items,
    "audioset": audioset_items,
    "fsd50k": fsd50k_items,
    "fsdnoisy18k": fsdnoisy18k_items,
    "esc50": esc50_items,
    "us8k": us8k_items,
    "gtzan": gtzan_items,
}


GENERIC_LAYOUTS = ("csv", "folder")  # the others are named after their dataset


def _converter(name: str) -> Callable[..., list[ClipItem] | SourceListing]:
    try:
        return LAYOUTS[name]
    except KeyError:
        generic = ", ".join(x for x in GENERIC_LAYOUTS if x in LAYOUTS)
        datasets = ", ".join(sorted(set(LAYOUTS) - set(GENERIC_LAYOUTS)))
        raise ValueError(f"unknown layout {name!r}; valid layouts: {generic} (generic) and "
                         f"{datasets} (datasets)") from None


def layout_options(name: str) -> list[str]:
    """The keyword options layout ``name`` takes (its converter's keyword-only parameters)."""
    parameters = inspect.signature(_converter(name)).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_options(name: str, opts: dict) -> None:
    """ValueError naming an option that layout ``name`` does not take."""
    accepted = layout_options(name)
    for option in opts:
        if option not in accepted:
            takes = f"it takes {', '.join(accepted)}" if accepted else "it takes no options"
            raise ValueError(f"option {option!r} does not apply to layout {name} ({takes})")


def load_layout(name: str, src: Path, **opts) -> SourceListing:
    """The clips of ``src`` read with layout ``name``; an unknown name lists the valid ones.

    An option the layout does not take raises ValueError naming the option and layout.
    """
    convert = _converter(name)
    _check_options(name, opts)
    result = convert(Path(src), **opts)
    return result if isinstance(result, SourceListing) else SourceListing(list(result))


def listing_parts(name: str, src: Path, **opts) -> list[Callable[[], SourceListing | list[ClipItem]]]:
    """:func:`load_layout`'s listing as parts the shard writer's workers read in parallel
    (:func:`dataio.writing.shard_pipeline.write_parts`): the folder layout one part per label
    folder; the others whole, as one part (read by one worker, off the main process)."""
    convert = _converter(name)
    _check_options(name, opts)
    if convert is folder_items:
        return list(folder_parts(Path(src)))
    return [functools.partial(load_layout, name, Path(src), **opts)]


def items_for_layout(name: str, src: Path, **opts) -> list[ClipItem]:
    """Only the clips of :func:`load_layout` (the missing ones and the vocabulary are dropped)."""
    return load_layout(name, src, **opts).items
