"""What a shard member holds: the clip formats, one module each, and their registry.

- ``flac`` (:mod:`dataio.formats.flac`): 16-bit FLAC, decoded at train time.
- ``pcm16`` (:mod:`dataio.formats.pcm16`): the same samples, raw; a view is a byte slice.
- ``logmel`` (:mod:`dataio.formats.logmel`): float16 dB frames computed once with the
  front end the manifest records.

Every caller asks the format (:class:`dataio.formats.base.ClipFormat`: its extension,
domain, payload, how it is opened, encoded, read by DALI and handed to the chain) instead
of comparing its name. A new format is a module and one :func:`register` call;
:class:`dataio.formats.codec.ClipCodec` is a format with a corpus's numbers (rate, bands).
"""

from __future__ import annotations

from dataio.formats.base import ClipFormat
from dataio.formats.flac import Flac
from dataio.formats.logmel import Logmel
from dataio.formats.pcm16 import Pcm16

FORMATS: dict[str, ClipFormat] = {}


def register(fmt: ClipFormat) -> ClipFormat:
    """Add ``fmt`` to the formats every command reads and writes (a name taken is refused)."""
    if fmt.name in FORMATS and type(FORMATS[fmt.name]) is not type(fmt):
        raise ValueError(f"clip format {fmt.name!r} is registered already")
    FORMATS[fmt.name] = fmt
    return fmt


def clip_format(name: str) -> ClipFormat:
    """The format called ``name``; ValueError listing the formats otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown clip format {name!r}: one of {', '.join(FORMATS)}") from None


def names() -> tuple[str, ...]:
    return tuple(FORMATS)


for _fmt in (Flac(), Pcm16(), Logmel()):
    register(_fmt)
