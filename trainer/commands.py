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
import time
from collections.abc import Callable

from dataio.errors import ConfigError, ManifestError
from dataio.schema import describe
from dataio.stop_signal import Stopped, note_stop, stop_pending, stop_taken, stops_are_held
from trainer.errors import INPUT_ERRNOS, CheckpointError, describe_error

INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ManifestError, FileNotFoundError, ValueError)
STOPPED = "stopped by {signal}; nothing half-written is kept under a final name (rerun the command)"


def config_parser(prog: str, doc: str | None, config_help: str, overrides_help: str) -> argparse.ArgumentParser:
    """A parser with ``--config``, ``--help-config`` and the trailing dotted overrides;
    the command adds its own options."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=config_help)
    p.add_argument("--help-config", action="store_true", help="list every key with its default and doc")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    return p


BASE_HELP = ("base = ''  # YAML file only: the recipe this one is written over (a path relative to this "
             "file's folder; its mappings merge key by key, any other value or {} replaces the base's)")


def print_help_config(schema: type, *more: str) -> int:
    """``--help-config``: every key of ``schema`` with its default and doc."""
    print("\n".join([BASE_HELP, *describe(schema), *more]))
    return 0


def setup_logging(rank: int = 0, world_size: int = 1, level: int = logging.INFO) -> None:
    """Every command logs alike: ``HH:MM:SS LEVEL logger: message``, with ``[rank N]`` where
    several ranks write to one terminal; ranks other than 0 log warnings and errors only."""
    where = f"[rank {rank}] " if world_size > 1 else ""
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING),
                        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class Reporter:
    """Prints ``<prog>: error: ...``; ``quiet`` ranks (all but rank 0) stay silent about
    errors every rank meets alike, and speak for their own (``everywhere=True``)."""

    def __init__(self, prog: str, quiet: bool = False):
        self.prog, self.quiet = prog, quiet

    def __call__(self, message, everywhere: bool = False) -> None:
        if everywhere or not self.quiet:
            end_progress_bars()
            print(f"{self.prog}: error: {message}", file=sys.stderr)


def end_progress_bars() -> None:
    """Close the progress bars still drawn (the error or stop cut their loop short), and end
    a line left open (a bar whose close the stop cut short), so the command's last line
    starts a line of its own instead of trailing a bar."""
    module = sys.modules.get("tqdm")  # imported only where a bar was drawn
    for bar in list(getattr(getattr(module, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 -- a bar that cannot redraw is left as it is
            pass
    if getattr(sys.stderr, "line_open", False):
        sys.stderr.write("\n")


class LineEnds:
    """A text stream passed through, knowing whether what was written last left its line
    open (a progress bar redrawn with "\r", or cut short): :func:`end_progress_bars` ends it."""

    def __init__(self, stream):
        self._stream, self.line_open = stream, False

    def write(self, text: str) -> int:
        if text:
            self.line_open = not text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def track_line_ends() -> None:
    """``sys.stderr`` as a :class:`LineEnds` (once), before a bar or a log handler takes it."""
    if not isinstance(sys.stderr, LineEnds) and sys.stderr is not None:
        sys.stderr = LineEnds(sys.stderr)


class CommandFailed(RuntimeError):
    """The command failed with its own exit ``status`` (a launched rank's); the message says how."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# The stop being delivered: a KeyboardInterrupt raised inside a C callback or a finaliser
# (soundfile's cffi I/O callbacks, a __del__) is printed as "Exception ignored" and lost, and
# the command ran on; until a catcher calls stop_handled() it is raised again every 2 s
# (dataio.stop_signal holds it, so a read that failed under it raises it, not blames the clip).
# One that comes while a module is being imported waits for the import's end ("deferred"):
# raised inside a C extension's initialisation it becomes that module's ImportError
# ("initialization failed"), which the importer may take for a missing module, and the next
# import of the module fails for good (optree's, under torch.optim's lazy import of
# torch._dynamo). So does one inside ``dataio.stop_signal.stops_held()``.
_pending = {"deferred": False, "scopes": 0}
REDELIVER_S = 2.0
POLL_S = 0.05


def _stopper(owner: int):
    def raise_stopped(signum, frame) -> None:
        if os.getpid() != owner:  # a forked worker (a pool's) inherited this: it behaves as before
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        take_stop(signum, frame)
    return raise_stopped


def take_stop(signum: int, frame) -> None:
    """Leave now: raise Stopped where the main thread is (``frame``), or, inside an import,
    as soon as it is done; delivered again until a catcher takes it (see ``_redeliver``)."""
    if not stop_pending():
        note_stop(signum)
        threading.Thread(target=_redeliver, args=(os.getpid(), signum), daemon=True).start()
    if stops_are_held() or _importing(frame):
        _pending["deferred"] = True
        return
    raise Stopped(signum)


def _importing(frame) -> bool:
    """Whether ``frame`` or a caller of it runs a module's import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _redeliver(owner: int, signum: int) -> None:
    """Deliver ``signum`` again until a catcher takes it, while the process is still inside
    a block of ours that handles stops (``sigterm_stops``, ``GracefulStop``): once it has
    left them, a stop sent again would reach whoever runs next (a caller's own handler, a
    test runner)."""
    tries, due = 0, time.monotonic() + REDELIVER_S
    while tries < 10:
        time.sleep(POLL_S)
        if stop_pending() != signum or not _pending["scopes"]:
            return
        if _pending["deferred"]:  # the main thread was importing or held it: again once it is not
            if not stops_are_held() and not _importing(sys._current_frames().get(threading.main_thread().ident)):
                _pending["deferred"] = False
                if not _stop_under_way():
                    os.kill(owner, signum)
                due = time.monotonic() + REDELIVER_S
        elif time.monotonic() >= due:
            tries, due = tries + 1, time.monotonic() + REDELIVER_S
            if not _stop_under_way():
                os.kill(owner, signum)


def _stop_under_way() -> bool:
    """Whether the main thread is handling the stop right now (cleaning up in an ``except``
    on its way to the catcher): it is not lost, and raising it again there would cut the
    clean-up short (a shard writer's working files left behind)."""
    current = sys._current_exceptions().get(threading.main_thread().ident)
    exc = current[1] if isinstance(current, tuple) else current  # a tuple before Python 3.12
    return isinstance(exc, KeyboardInterrupt)


def stop_handled() -> None:
    """The stop reached its catcher (or a graceful stop took it): no more redelivery."""
    note_stop(0)
    _pending["deferred"] = False


@contextlib.contextmanager
def sigterm_stops():
    """Ctrl-C and SIGTERM (a scheduler's pre-emption, ``docker stop``) end the command alike,
    not silently, and surely (see ``_redeliver``): a command with its own graceful stop
    installs its handlers inside this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _stopper(os.getpid())
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _pending["scopes"] += 1
    previous_hook, previous_thread_hook = sys.unraisablehook, threading.excepthook

    def quiet_lost_stop(unraisable) -> None:  # the stop is delivered again: no traceback for it
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    def quiet_broken_pipes(args) -> None:
        # after a stop, a helper thread (multiprocessing's resource sharer, a loader's pin
        # thread) whose peer, a stopped worker, hung up fails on the connection: that is
        # the stop, not news; the command's one line says so
        if not (stop_taken() and issubclass(args.exc_type, (OSError, EOFError))):
            previous_thread_hook(args)
    sys.unraisablehook, threading.excepthook = quiet_lost_stop, quiet_broken_pipes
    try:
        yield
    finally:
        _pending["scopes"] -= 1
        sys.unraisablehook = previous_hook
        if not stop_taken():  # a stopped worker's hang-up may still reach a thread on the way out
            threading.excepthook = previous_thread_hook
        for s, old in previous.items():
            signal.signal(s, old)


class GracefulStop:
    """Ctrl-C and SIGTERM ask a command with a safe point (a step's end, a sweep's saved
    state) to stop there: the first signal is kept in ``signal``, announced and passed to
    ``forward``; a second one leaves at once (Stopped). One within 2 s of the first is the
    same stop arriving twice (a terminal's Ctrl-C reaches the ranks and torchrun, which
    forwards it). Before ``ready()`` holds there is no safe point yet: a signal leaves at once."""

    def __init__(self, announce: str, log: logging.Logger, forward: Callable[[], None] | None = None,
                 ready: Callable[[], bool] = lambda: True):
        self.announce, self.log, self.forward, self.ready = announce, log, forward, ready
        self.signal, self._at, self.previous = 0, 0.0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            _pending["scopes"] += 1
        return self

    def arm(self) -> None:
        """Ours again, after a library installed its own (``ray.init`` does)."""
        for s in self.previous:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signal:  # a second stop leaves now; the same one arriving twice is ignored
            if time.monotonic() - self._at > 2.0:
                take_stop(signum, frame)
            return
        if not self.ready():
            take_stop(signum, frame)
            return
        stop_handled()  # a stop deferred past an import, delivered again once a safe point is ready
        self.signal, self._at = signum, time.monotonic()
        self.log.warning(self.announce.format(signal=signal.Signals(signum).name))
        if self.forward is not None:
            self.forward()

    def __exit__(self, *exc) -> None:
        if self.previous:
            _pending["scopes"] -= 1
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def report_stop(prog: str, err: KeyboardInterrupt, message: str, quiet: bool = False) -> int:
    """A stop taken: no more redelivery, one line, 128 + N. ``message`` may name the signal
    (``{signal}``); if it does not, a signal other than Ctrl-C is named after it."""
    stop_handled()
    signum = getattr(err, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    if not quiet:
        end_progress_bars()
        named = "" if "{signal}" in message or signum == signal.SIGINT else f" ({name})"
        print(f"{prog}: {message.format(signal=name)}{named}", file=sys.stderr)
    return 128 + signum


def run_guarded(prog: str, work: Callable[[], int], *, input_errors: tuple = INPUT_ERRORS,
                run_errors: tuple = (), own_errors: tuple = (), quiet: bool = False,
                on_interrupt: str = STOPPED, rank: int = 0, world_size: int = 1,
                log_level: int = logging.INFO) -> int:
    """The one way every command runs: logging set up (:func:`setup_logging`), then
    ``work()``'s status, or the status and message of what it raised: ``input_errors``
    exit 2, ``run_errors`` 1 (printed once), ``own_errors`` 1 (printed by every rank that
    meets them: a rank's own data or disk), an OSError 1 (2 for a path too long), CommandFailed its status, Ctrl-C
    130 and SIGTERM 143 (``on_interrupt`` printed)."""
    track_line_ends()
    setup_logging(rank, world_size, log_level)
    report = Reporter(prog, quiet)
    try:
        with sigterm_stops():
            return work()
    except KeyboardInterrupt as err:
        return report_stop(prog, err, on_interrupt, quiet)
    except CommandFailed as err:
        report(err)
        return err.status
    except own_errors as err:
        report(describe_error(err) if isinstance(err, OSError) else err, everywhere=True)
        return 2 if getattr(err, "errno", None) in INPUT_ERRNOS else 1
    except run_errors as err:
        report(err)
        return 1
    except input_errors as err:
        report(err)
        return 2
    except OSError as err:  # a full disk or a vanished folder while writing results or logs
        report(describe_error(err), everywhere=True)
        return 2 if err.errno in INPUT_ERRNOS else 1


__all__ = ["CheckpointError", "CommandFailed", "ConfigError", "GracefulStop", "INPUT_ERRORS", "STOPPED", "Stopped",
           "config_parser", "print_help_config", "report_stop", "run_guarded", "setup_logging", "sigterm_stops",
           "stop_handled", "take_stop"]
