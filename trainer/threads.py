"""``train.threads``: the trainer's CPU threads (intra-op), sane on a busy machine.

PyTorch's default is one thread per core, each spinning at every parallel region until
all arrive: with another process busy on one of two cores the step ran 3.3x slower
(ResNet-18 width 32, 64 clips: 616 ms against 188 ms), where one thread takes 355 ms.
``auto`` (0) samples the cores this process may use for 0.2 s at start and takes the idle
ones (at least 1); an ``OMP_NUM_THREADS`` in the environment (torchrun sets 1 per rank)
is respected. A positive number is taken as given.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("audioclr.threads")

BUSY = 0.5  # a core busier than this (over the sample) is left to whoever uses it


def _cpu_times() -> dict[int, tuple[int, int]]:
    """{core: (idle jiffies, total jiffies)} from /proc/stat (empty where there is none)."""
    times = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    values = [int(v) for v in fields]
                    times[int(name[3:])] = (values[3] + values[4], sum(values[:8]))
    except OSError:
        pass
    return times


def idle_cores(sample_seconds: float = 0.2) -> int | None:
    """How many of this process's cores were mostly idle over ``sample_seconds``; None
    where it cannot be told (no /proc/stat)."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times()
    if not before:
        return None
    time.sleep(sample_seconds)
    after = _cpu_times()
    idle = 0
    for core in mine:
        if core in before and core in after:
            d_idle, d_total = (a - b for a, b in zip(after[core], before[core]))
            idle += d_total <= 0 or d_idle / d_total >= 1 - BUSY
    return idle


def set_threads(setting: int, device: torch.device) -> int:
    """Apply ``train.threads`` (0 = auto); returns the threads now in use."""
    if setting > 0:
        torch.set_num_threads(setting)
    elif device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        free = idle_cores()
        if free is not None and free < torch.get_num_threads():
            log.warning("train.threads=auto: %d of this process's cores are busy with other work; training "
                        "on %d thread(s) instead of %d", torch.get_num_threads() - max(free, 1), max(free, 1),
                        torch.get_num_threads())
            torch.set_num_threads(max(free, 1))
    return torch.get_num_threads()
