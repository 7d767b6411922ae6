"""Where a training step's time goes, summed between two metric records.

Per step: the wait for the next batch, then the step itself split into forward (with the
loss), backward and optimizer step; the gradient all-reduce (DDP, timed by a comm hook
from launch to completion, so it overlaps the backward); per record: the slowest rank
against the mean (rank skew), the peak device memory and clips/s per rank. On a CPU every
step is timed (the clock is the work); on a GPU a phase boundary needs a synchronisation,
so only the step before each record is split into phases, the others count as a whole.
A data wait above ``WAIT_WARNING`` of the step time, over ``WARN_WINDOW`` steps at least
(a loader's start at an epoch's turn is not a trend), is warned about, once a minute at most.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time

import torch

from trainer.parallel import distributed

log = logging.getLogger("audioclr.telemetry")

WAIT_WARNING = 0.10
WARN_WINDOW = 50
PHASES = ("forward", "backward", "optimizer")


class Telemetry:
    def __init__(self, device: torch.device, batch_size: int):
        self.device, self.batch_size = device, batch_size
        self.detailed = True  # this step's phases are timed
        self.allreduce_seconds = 0.0  # added to by a DDP comm hook
        self._warned_at = -1e9
        self._window = [0.0, 0.0, 0]  # wait, step time, steps since the input was last judged
        self._reset()

    def _reset(self) -> None:
        self.steps = self.timed_steps = 0
        self.wait = self.busy = 0.0
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.allreduce_seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_step(self, detailed: bool) -> None:
        """``detailed``: split this step into phases (always on a CPU)."""
        self.detailed = detailed or self.device.type != "cuda"
        if self.detailed:
            self._sync()
            self.timed_steps += 1

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.detailed:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.phases[name] += time.perf_counter() - start

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def step_done(self, seconds: float) -> None:
        self.steps += 1
        self.busy += seconds

    def record(self) -> dict[str, float]:
        """The window's means (collective: every rank calls it at the same step)."""
        steps = max(self.steps, 1)
        step_time = (self.wait + self.busy) / steps
        mine = {"data_wait_seconds": self.wait / steps, "step_compute_seconds": self.busy / steps,
                "allreduce_seconds": self.allreduce_seconds / steps}
        mine.update({f"{name}_seconds": value / max(self.timed_steps, 1) for name, value in self.phases.items()})
        values = distributed.reduce_mean({**mine, "step": step_time}, self.device)
        mean_step = values.pop("step")
        slowest = distributed.reduce_max({"step": step_time}, self.device)["step"]
        values.update(rank_skew=slowest / max(mean_step, 1e-12), step_seconds_slowest_rank=slowest,
                      clips_per_second_per_rank=self.batch_size / max(mean_step, 1e-12),
                      data_wait_fraction=values["data_wait_seconds"] / max(mean_step, 1e-12),
                      peak_memory_mib=peak_memory_mib(self.device))
        self._judge_input(values["data_wait_seconds"] * steps, mean_step * steps, steps)
        self._reset()
        return values

    def _judge_input(self, wait: float, total: float, steps: int) -> None:
        window = self._window
        window[0] += wait
        window[1] += total
        window[2] += steps
        if window[2] < WARN_WINDOW:
            return
        fraction, per_step = window[0] / max(window[1], 1e-12), window[1] / window[2]
        if fraction > WAIT_WARNING and time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            log.warning("input-bound: %.0f%% of each step waits for data over the last %d steps (%.1f ms of "
                        "%.1f ms); raise data.num_workers, or see `audioclr bench data`", 100 * fraction,
                        window[2], 1e3 * fraction * per_step, 1e3 * per_step)
        self._window = [0.0, 0.0, 0]


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since the last record: the device's allocations on a GPU (then reset),
    the process's peak resident set on a CPU (never reset)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_allreduce(ddp_model, telemetry: Telemetry) -> None:
    """A DDP comm hook doing what the built-in one does (average each gradient bucket over
    ranks) and adding the time from launch to completion to ``telemetry``. With NCCL the
    completion is when the work is queued on the stream, so there it times the launch."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        start = time.perf_counter()

        def done(fut):
            telemetry.allreduce_seconds += time.perf_counter() - start
            return fut.value()
        return allreduce_hook(None, bucket).then(done)

    ddp_model.register_comm_hook(None, hook)
