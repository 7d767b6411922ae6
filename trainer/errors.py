"""The errors the commands report, in a leaf module that imports nothing heavy: the
command dispatcher (:mod:`trainer.commands`) holds its stop handlers before torch is
imported, so a Ctrl-C or SIGTERM during start-up ends in one line too."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint or weights file cannot be written or trusted; the message names it."""


def describe_error(err: BaseException) -> str:
    """One line for an I/O failure: the OS's words and the file, or the first line."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f" ({err.filename})" if err.filename else "")
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
