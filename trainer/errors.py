"""The errors the commands report, in a leaf module that imports nothing heavy: the
command dispatcher (:mod:`trainer.commands`) holds its stop handlers before torch is
imported, so a Ctrl-C or SIGTERM during start-up ends in one line too."""

from __future__ import annotations

import errno

# I/O failures that come from what the user typed, not from the machine: they exit 2 like
# any other bad input
INPUT_ERRNOS = frozenset({errno.ENAMETOOLONG})


class CheckpointError(RuntimeError):
    """A checkpoint or weights file cannot be written or trusted; the message names it."""


def describe_error(err: BaseException) -> str:
    """One line for an I/O failure: the OS's words and the file, or the first line."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f" ({_shortened(str(err.filename))})" if err.filename else "")
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _shortened(name: str, keep: int = 160) -> str:
    """A path short enough for one line: its head and tail around the count of what is cut."""
    if len(name) <= keep:
        return name
    cut = len(name) - keep
    return f"{name[:keep - 40]}...[{cut} characters]...{name[-40:]}"

