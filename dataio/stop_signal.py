"""A stop (Ctrl-C, SIGTERM) that arrived inside a C callback.

soundfile decodes through cffi callbacks into Python; a stop raised inside one is printed
as "Exception ignored" and lost, and the decoder then fails on a good clip. Code that
treats a failed read as a bad clip (skipped, rejected, reported) asks
:func:`raise_if_stopping` first, so the clip is not blamed and the stop ends the command.
The command layer (:mod:`trainer.commands`) records the stop here when its handler runs.
Code that a stop must not cut short (starting a process, a library's start-up) runs
inside :func:`stops_held`: the command's handler takes the stop at the block's end."""

from __future__ import annotations

import contextlib

# signum of a stop delivered and not yet caught by the command (0: none); ``taken``: the
# last stop this process received, kept after its catcher took it; ``held``: how many
# ``stops_held`` blocks the process is in
_pending = {"signum": 0, "taken": 0, "held": 0}


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the command has no graceful stop of its own."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def note_stop(signum: int) -> None:
    """Record a stop delivered (0: it reached its catcher)."""
    _pending["signum"] = signum
    _pending["taken"] = signum or _pending["taken"]


def stop_taken() -> int:
    """The signal number of a stop this process received, caught or not (0: none yet):
    what failed after it may have failed because of it."""
    return _pending["taken"]


def stop_pending() -> int:
    """The signal number of a stop on its way, or 0."""
    return _pending["signum"]


def raise_if_stopping() -> None:
    """Raise the stop on its way, if one is: a read that failed under it failed because of it."""
    if _pending["signum"]:
        raise Stopped(_pending["signum"])


@contextlib.contextmanager
def stops_held():
    """A stop that comes inside is taken at the block's end: for a start-up that, cut short,
    leaves processes running (``ray.init``) or half-started (a spawned worker that then
    finds its parent gone prints a traceback of its own)."""
    _pending["held"] += 1
    try:
        yield
    finally:
        _pending["held"] -= 1


def stops_are_held() -> bool:
    """Whether the process is inside a :func:`stops_held` block."""
    return _pending["held"] > 0
