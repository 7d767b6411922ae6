"""Worker process pools that leave a stop to their parent.

A Ctrl-C in a terminal reaches every process of the foreground group: the workers of a
pool too, which then print a ``KeyboardInterrupt`` traceback each (from wherever they were,
often importing torch) before the parent's one line. Workers started here ignore SIGINT
from birth: the parent's stop handling shuts the pool down and says what was kept. They
are spawned, not forked (a parent that ran torch ops may hold OpenMP threads a forked
child would wait on); an ignored signal is the one disposition that survives the exec.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing.context
import signal
import tempfile
import threading

from dataio.errors import ConfigError
from dataio.stop_signal import stops_held

# a Unix socket's path holds 107 bytes; multiprocessing puts the one a process passes file
# descriptors through (a loader worker, a tensor to the main process) at
# TMPDIR/pymp-<8 random characters>/listener-<8 random characters>: 32 more than TMPDIR
SOCKET_PATH_MAX, SOCKET_SUFFIX = 107, len("/pymp-12345678/listener-12345678")


class _QuietProcess(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        # a stop waits for the start's end: the parent writes the spawned child its work
        # after the exec, and a child whose parent left before that prints a traceback
        with stops_held():
            if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
                return super().start()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through the exec
            try:
                super().start()
            finally:
                signal.signal(signal.SIGINT, previous)


class _QuietContext(multiprocessing.context.SpawnContext):
    Process = _QuietProcess


def worker_pool(workers: int | None) -> futures.ProcessPoolExecutor:
    """A ProcessPoolExecutor of ``workers`` spawned processes that ignore SIGINT."""
    return futures.ProcessPoolExecutor(workers, mp_context=_QuietContext())


def check_socket_room(setting: str) -> None:
    """ConfigError unless the temporary folder leaves room for the socket path a worker
    passes batches through: past it the worker's send fails in a background thread and
    the main process waits for that batch forever."""
    folder = tempfile.gettempdir()
    need = len(folder.encode()) + SOCKET_SUFFIX
    if need > SOCKET_PATH_MAX:
        raise ConfigError(f"the temporary folder {folder} ({len(folder)} characters, from TMPDIR) is too long "
                          f"for the sockets worker processes hand batches through (a Unix socket path holds "
                          f"{SOCKET_PATH_MAX} bytes, these would need {need}): set TMPDIR to a shorter folder "
                          f"(e.g. /tmp), or {setting}=0")


def shut_down(pool: futures.ProcessPoolExecutor, wait: bool = True) -> None:
    """``pool.shutdown`` (pending work cancelled), also for a pool whose manager thread a
    stop cut short while it started (``submit`` starts it): shutdown then cannot join it
    ("cannot join thread before it is started"), so its workers are ended here."""
    try:
        pool.shutdown(wait=wait, cancel_futures=True)
    except RuntimeError:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
            process.join(timeout=10)
