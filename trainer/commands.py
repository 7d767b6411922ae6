"""What the config-driven commands (pretrain, eval, tune) share: the ``--config`` /
``--help-config`` / dotted-override command line, and one mapping from what went wrong
to an exit status and a one-line message, never a traceback.

Exit statuses: 0 done; 2 the input is wrong (a config key, a missing file, a manifest,
weights that do not fit): fix it and rerun; 1 the run failed (a NaN loss, a rank's
unreadable data, a full disk); 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from dataio.manifest import ManifestError
from dataio.schema import ConfigError
from trainer.safe_files import CheckpointError, describe_error

INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ManifestError, FileNotFoundError, ValueError)


def config_parser(prog: str, doc: str | None, config_help: str, overrides_help: str) -> argparse.ArgumentParser:
    """A parser with ``--config``, ``--help-config`` and the trailing dotted overrides;
    the command adds its own options."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=config_help)
    p.add_argument("--help-config", action="store_true", help="list every key with its default and doc")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    return p


def print_help_config(schema: type, *more: str) -> int:
    """``--help-config``: every key of ``schema`` with its default and doc."""
    from trainer.config import describe

    print("\n".join([*describe(schema), *more]))
    return 0


def setup_logging(rank: int = 0, world_size: int = 1) -> None:
    """Every command logs alike: ``HH:MM:SS LEVEL logger: message``, with ``[rank N]`` where
    several ranks write to one terminal; ranks other than 0 log warnings and errors only."""
    where = f"[rank {rank}] " if world_size > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class Reporter:
    """Prints ``<prog>: error: ...``; ``quiet`` ranks (all but rank 0) stay silent about
    errors every rank meets alike, and speak for their own (``everywhere=True``)."""

    def __init__(self, prog: str, quiet: bool = False):
        self.prog, self.quiet = prog, quiet

    def __call__(self, message, everywhere: bool = False) -> None:
        if everywhere or not self.quiet:
            print(f"{self.prog}: error: {message}", file=sys.stderr)


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the command has no graceful stop of its own."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stopper(owner: int):
    def raise_stopped(signum, frame) -> None:
        if os.getpid() != owner:  # a forked worker (a pool's) inherited this: it dies as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)
    return raise_stopped


@contextlib.contextmanager
def sigterm_stops():
    """SIGTERM (a scheduler's pre-emption, ``docker stop``) ends the command as Ctrl-C does,
    not silently: a command with its own graceful stop installs its handler inside this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stopper(os.getpid()))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_guarded(prog: str, work: Callable[[], int], *, input_errors: tuple = INPUT_ERRORS,
                run_errors: tuple = (), own_errors: tuple = (), quiet: bool = False,
                on_interrupt: str = "error: interrupted") -> int:
    """``work()``'s status, or the status and message of what it raised: ``input_errors``
    exit 2, ``run_errors`` 1 (printed once), ``own_errors`` 1 (printed by every rank that
    meets them: a rank's own data or disk), an OSError 1, Ctrl-C 130 and SIGTERM 143
    (``on_interrupt`` printed)."""
    report = Reporter(prog, quiet)
    try:
        with sigterm_stops():
            return work()
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        if not quiet:
            named = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
            print(f"{prog}: {on_interrupt}{named}", file=sys.stderr)
        return 128 + signum
    except own_errors as err:
        report(describe_error(err) if isinstance(err, OSError) else err, everywhere=True)
        return 1
    except run_errors as err:
        report(err)
        return 1
    except input_errors as err:
        report(err)
        return 2
    except OSError as err:  # a full disk or a vanished folder while writing results or logs
        report(describe_error(err), everywhere=True)
        return 1


__all__ = ["CheckpointError", "ConfigError", "INPUT_ERRORS", "Stopped", "config_parser", "print_help_config",
           "run_guarded", "setup_logging", "sigterm_stops"]
