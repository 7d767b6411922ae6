"""Files written whole or not at all: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a full disk or a stop: no .tmp left behind
        tmp.unlink(missing_ok=True)
        raise
    return path
