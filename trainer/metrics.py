"""Metric records of a run: ``metrics.jsonl`` and TensorBoard events, written by rank 0."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

log = logging.getLogger(__name__)


def _without_tensorflow() -> None:
    """Make TensorBoard write events with its own stub of TensorFlow even where TensorFlow
    is installed (HEAR's validator pulls it in): importing it would take seconds and fill
    the log with its CUDA warnings, and a scalar event needs nothing from it. TensorBoard
    takes the stub when the module ``tensorboard.compat.notf`` can be imported."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


class MetricWriter:
    """Appends one JSON record per call; on resume, records past the resumed step (written
    by the killed run after its last checkpoint) are dropped so the file reads as one run."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            _without_tensorflow()
            from torch.utils.tensorboard import SummaryWriter  # deferred: TensorBoard is slow to import
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
