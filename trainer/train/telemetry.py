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
import sys
import time

import torch
from tqdm import tqdm

from trainer.parallel import distributed

log = logging.getLogger("audioclr.telemetry")

WAIT_WARNING = 0.10
WARN_WINDOW = 50
PHASES = ("forward", "backward", "optimizer")


class Telemetry:
    """The step record of ``metrics.jsonl``, built here and only here."""

    def __init__(self, device: torch.device, batch_size: int, world_size: int = 1):
        self.device, self.batch_size, self.world_size = device, batch_size, world_size
        self.started = time.perf_counter()
        self.last_loss: float | None = None  # the loss of the last record (the progress bar shows it)
        self.last_step_seconds = 0.0
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
        self.last_step_seconds = seconds

    def record(self, loss: float, skipped: int, lr: float, grad_norm: float, epoch: float) -> dict[str, float]:
        """The step's loss, clips left out and learning rate, with the window's timings
        (means over ranks; collective: every rank calls it at the same step)."""
        steps = max(self.steps, 1)
        step_time = (self.wait + self.busy) / steps
        mine = {"loss": loss, "skipped_clips": skipped, "step_seconds": self.last_step_seconds,
                "data_wait_seconds": self.wait / steps, "step_compute_seconds": self.busy / steps,
                "allreduce_seconds": self.allreduce_seconds / steps}
        mine.update({f"{name}_seconds": value / max(self.timed_steps, 1) for name, value in self.phases.items()})
        values = distributed.reduce_mean({**mine, "step": step_time}, self.device)
        mean_step = values.pop("step")
        slowest = distributed.reduce_max({"step": step_time}, self.device)["step"]
        values.update(rank_skew=slowest / max(mean_step, 1e-12), step_seconds_slowest_rank=slowest,
                      clips_per_second_per_rank=self.batch_size / max(mean_step, 1e-12),
                      data_wait_fraction=values["data_wait_seconds"] / max(mean_step, 1e-12),
                      peak_memory_mib=peak_memory_mib(self.device), lr=lr, epoch=epoch,
                      elapsed=time.perf_counter() - self.started)
        values["clips_per_second"] = values["clips_per_second_per_rank"] * self.world_size
        if grad_norm:
            values["grad_norm"] = grad_norm
        self._judge_input(values["data_wait_seconds"] * steps, mean_step * steps, steps)
        self._reset()
        self.last_loss = values["loss"]
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


class EpochCounts:
    """Clips left out (undecodable, or short with short_clips=skip), zero-padded (shorter
    than a view) and given by each corpus in one epoch, summed over ranks at its end."""

    def __init__(self, sources: list, device: torch.device):
        self.sources, self.device = sources, device
        self._reset()

    def _reset(self) -> None:
        self.counts = {"skipped": 0, "short": 0, **{f"{s.name}_clips": 0 for s in self.sources}}

    def add(self, batch) -> None:
        self.counts["skipped"] += batch.skipped
        self.counts["short"] += batch.short
        for source, n in zip(self.sources, batch.sources or []):
            self.counts[f"{source.name}_clips"] += n

    def report(self, epoch: int, step: int, metrics) -> None:
        """Log the epoch's totals and write them to ``metrics`` (collective)."""
        totals = distributed.reduce_sum(self.counts, self.device)
        self._reset()
        if totals["skipped"]:
            log.warning("epoch %d: %d clip(s) skipped (undecodable, or too short with short_clips=skip)",
                        epoch, totals["skipped"])
        if totals["short"]:  # notes and drum hits are short by nature: padding them is normal
            log.info("epoch %d: %d view(s) zero-padded (clips shorter than a view)", epoch, totals["short"])
        record = {f"epoch_{k}_clips": v for k, v in totals.items() if k in ("skipped", "short")}
        per_source = {k[:-len("_clips")]: v for k, v in totals.items() if k.endswith("_clips")}
        if per_source:  # clips each corpus gave this epoch (or since the resume point)
            record.update({f"epoch_clips_{k}": v for k, v in per_source.items()})
            log.info("epoch %d: clips per corpus: %s", epoch, ", ".join(f"{k} {v:.0f}" for k, v in per_source.items()))
        if totals["skipped"] or totals["short"] or per_source:
            metrics.write(step, record)


class ProgressBar:
    """The run's tqdm bar on stderr (rank 0, ``train.progress``), with the last loss."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="pretrain", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
        self.notes: dict[str, str] = {}

    def __enter__(self):
        return self

    def advance(self, loss: float | None) -> None:
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", **self.notes, refresh=False)

    def note(self, **values: str) -> None:
        """Keep ``values`` (the online probe's scores) beside the loss from now on."""
        self.notes.update(values)

    def __exit__(self, *exc) -> None:
        self.bar.close()
