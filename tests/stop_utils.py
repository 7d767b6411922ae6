"""The signal fuzzer's tools (issue 36): stop a command as a person or a scheduler does, at
a seeded moment, and check what it left.

Ctrl-C in a terminal reaches the whole process group, workers included; SIGTERM (kill,
``docker stop``, a scheduler's pre-emption) reaches the command alone. A stopped command
must end with 128 + N and one line saying so (no traceback), leave no ``.tmp`` behind nor
a process of its own running, and keep what it had written before. A few moments per
command in the default run; ``AUDIOCLR_FUZZ=long`` (and ``AUDIOCLR_FUZZ_SEED=N`` for
another draw) tries many more::

    AUDIOCLR_FUZZ=long AUDIOCLR_FUZZ_SEED=7 python3 -m pytest -q tests/dataio/test_stops.py tests/trainer/test_stops.py
"""

from __future__ import annotations

import atexit
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LONG = os.environ.get("AUDIOCLR_FUZZ") == "long"
SEED = int(os.environ.get("AUDIOCLR_FUZZ_SEED", "0"))

# the command's own lines: "audioclr X: ..." or a log line "HH:MM:SS LEVEL audioclr.x: ..."
OWN_LINE = re.compile(r"(\d\d:\d\d:\d\d (\[rank \d+\] )?[A-Z]+ )?audioclr\b")
SAYS_STOPPED = re.compile(r"\b(stopped|interrupted)\b")
# lines a Ray worker prints through the driver carry "(name pid=N)": as Ray tears a worker
# down it may print an ignored exception of its own; the command itself prints none
WORKER_LINE = re.compile(r"\(\S* ?pid=\d+")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^KeyboardInterrupt|^Exception ignored")


@dataclass(frozen=True)
class Moment:
    """When a stop comes (seconds after the start) and which signal it is."""
    after: float
    sig: signal.Signals

    def __str__(self) -> str:
        return f"{self.sig.name}@{self.after:.1f}s"


def moments(name: str, low: float, high: float, count: int, long_count: int) -> list[Moment]:
    """``count`` seeded moments in [``low``, ``high``) seconds (``long_count`` under
    ``AUDIOCLR_FUZZ=long``), drawn for ``name`` alone: adding a command moves no other's."""
    rng = random.Random(f"{name}:{SEED}")
    return [Moment(round(rng.uniform(low, high), 1), rng.choice([signal.SIGINT, signal.SIGTERM]))
            for _ in range(long_count if LONG else count)]


@dataclass
class StopResult:
    """How a stopped command ended: ``signalled`` is False when it had ended before the
    moment; ``stragglers`` are processes of its session still alive after it (killed)."""
    where: str
    returncode: int
    stdout: str
    stderr: str
    signalled: bool
    stragglers: list[str]


def stop_at(cmd: list[str], moment: Moment, env: dict, where: str, timeout: float = 300,
            grace: float = 10.0) -> StopResult:
    """Run ``cmd`` in a session of its own; ``moment.after`` seconds in, send the signal:
    SIGINT to the whole group (a terminal's Ctrl-C), SIGTERM to the command alone."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    signalled = False
    try:
        out, err = proc.communicate(timeout=moment.after)
    except subprocess.TimeoutExpired:
        if moment.sig == signal.SIGINT:
            os.killpg(proc.pid, moment.sig)
        else:
            proc.send_signal(moment.sig)
        signalled = True
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"{where}: still running {timeout:.0f} s after the stop\n{err[-3000:]}") from None
    return StopResult(where, proc.returncode, out, err, signalled, _stragglers(proc.pid, grace))


def _session_processes(sid: int) -> list[str]:
    """'pid command' of the live (not zombie) processes of session ``sid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{stat.parent.name} {command.strip()[:160]}")
        except (OSError, ValueError, IndexError):
            continue  # it ended while being read
    return found


def _stragglers(sid: int, grace: float) -> list[str]:
    """The processes the command left running ``grace`` seconds after it ended (then killed)."""
    deadline = time.monotonic() + grace
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        for line in left:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


def own_lines(stderr: str) -> list[str]:
    """The lines the command itself printed (not a Ray worker's)."""
    return [ln for ln in stderr.splitlines() if not WORKER_LINE.search(ln)]


def check_stop(run: StopResult, moment: Moment, finished: bool) -> None:
    """The one-line rule. Stopped: 128 + N, one line of its own that says so, the last.
    A stop that came once the work was done (``finished``) may also have found the command
    exiting (0) or past its handlers (the signal's default action). Never a traceback."""
    err = run.stderr
    assert not run.stragglers, f"{run.where}: processes left running: {run.stragglers}\n{err[-3000:]}"
    mine = own_lines(err)
    assert not [ln for ln in mine if TRACEBACK.search(ln)], f"{run.where}: a traceback\n{_tail(err)}"
    if not run.signalled or run.returncode in (0, -moment.sig):
        assert finished and run.returncode in (0, -moment.sig), \
            f"{run.where}: rc {run.returncode} before its work was done\n{_tail(err)}"
        return
    assert run.returncode == 128 + moment.sig, f"{run.where}: rc {run.returncode}\n{_tail(err)}"
    said = [ln for ln in mine if OWN_LINE.match(ln)]
    stops = [ln for ln in said if SAYS_STOPPED.search(ln)]
    assert len(stops) == 1 and said[-1] == stops[0], f"{run.where}: not one last line saying so\n{_tail(err)}"


def _tail(err: str) -> str:
    """The end of ``err``, from its first traceback's start when there is one."""
    first = err.find("Traceback (most recent call last)")
    return err[max(0, first - 1500):][-12000:] if first >= 0 else err[-4000:]


def tmp_leftovers(*folders: Path, tmpdir: Path | None = None) -> list[Path]:
    """Working files under ``folders`` (a name ending in ``.tmp`` or holding ``.tmp.``, or
    Ray Tune's ``.<uuid>-tmp-<name>``),
    and anything in ``tmpdir`` (the command's ``TMPDIR``) but torch's compile cache, which
    every run keeps there by design."""
    left = [p for folder in folders if folder.exists() for p in folder.rglob("*")
            if p.name.endswith(".tmp") or ".tmp." in p.name
            or (p.name.startswith(".") and "-tmp-" in p.name)]
    if tmpdir is not None and tmpdir.exists():
        left += [p for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")]
    return left


def tmpdir_env(env: dict, folder: Path) -> dict:
    """``env`` with ``TMPDIR`` set to a fresh folder that ``folder`` links to, to find what
    a stop leaves there. The folder itself is short, under /tmp: the sockets worker
    processes pass batches through live in it, and a socket path holds 107 bytes (a
    test's own folder, under pytest-xdist's, is too long: the command refuses it)."""
    short = Path(tempfile.mkdtemp(prefix="acs-", dir="/tmp"))
    atexit.register(shutil.rmtree, short, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(short, target_is_directory=True)
    return {**env, "TMPDIR": str(short)}


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_kept(before: dict[str, str], folder: Path, where: str, may_change: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` (a :func:`snapshot`) is still there, unchanged, except
    those whose name is in ``may_change`` (rewritten whole by design)."""
    now = snapshot(folder)
    changed = [k for k, digest in before.items() if now.get(k) != digest and Path(k).name not in may_change]
    assert not changed, f"{where}: earlier outputs changed or gone: {changed[:10]}"


def rerun(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """The same command again, to its end, as the stop line advises."""
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
