"""What every augmentation op shares: its config fields, range checks, and the view of
the batch it works on.

An op is a dataclass of its settings (validated in ``__post_init__``) with a ``domain``
("wave": waveform rows [N, S]; "mel": normalised log-mel rows [N, F, T]), the number of
uniform draws it takes per row (``draws``), how many input samples or frames it needs
for a given output size, and ``apply(x, u, rows)``: a batched tensor function of the
rows, their draws ``u`` [N, draws] and the batch context ``rows``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from dataio.frontend import FrontendConfig
from dataio.schema import check, option


def check_range(values: list, key: str, low: float | None = None, high: float | None = None,
                integer: bool = False) -> None:
    """``values`` must be ``[low, high]`` with low <= high, inside the given bounds."""
    check(isinstance(values, list) and len(values) == 2, key, f"must be a range [low, high], got {values!r}")
    lo, hi = values
    check(lo <= hi, key, f"the range [{lo}, {hi}] is reversed (low > high)")
    if integer:
        check(float(lo).is_integer() and float(hi).is_integer(), key, f"must be whole numbers, got {values!r}")
    if low is not None:
        check(lo >= low, key, f"must be >= {low}, got {values!r}")
    if high is not None:
        check(hi <= high, key, f"must be <= {high}, got {values!r}")


def lerp(values: list, u: torch.Tensor) -> torch.Tensor:
    """Uniform draws ``u`` mapped onto the range ``values`` = [low, high]."""
    return values[0] + (values[1] - values[0]) * u


@dataclass
class OpConfig:
    """Fields every op has."""

    op: str = option("", "which op (default: the entry's name, so a chain may hold one op twice "
                     "under two names)")
    p: float = option(1.0, "probability that a view gets this op")
    views: list[int] = option([], "apply to these view indices only (0 = the first view, COLA's anchor); "
                              "empty = every view")
    per: str = option("view", "draw the op's parameters for each view, or once per clip (its views share them)",
                      ("view", "clip"))

    domain = "wave"
    draws = 0
    ranges: ClassVar[dict] = {}  # field -> (lowest, highest[, "int"]): a [low, high] setting and its bounds

    def __post_init__(self) -> None:
        check(0.0 <= self.p <= 1.0, "p", f"must be a probability in [0, 1], got {self.p}")
        check(all(v >= 0 for v in self.views), "views", "view indices must be >= 0")
        for name, bounds in self.ranges.items():
            check_range(getattr(self, name), name, bounds[0], bounds[1], integer="int" in bounds)

    def needed(self, out_size: int) -> int:
        """Input samples (wave) or frames (mel) this op needs to produce ``out_size``."""
        return out_size

    def prepare(self, ctx: BuildContext) -> None:
        """Build what the op needs once per run (tables, filters); may raise ConfigError."""

    def apply(self, x: torch.Tensor, u: torch.Tensor, rows: Rows) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class BuildContext:
    """What ops may read when the chain is built."""

    frontend: FrontendConfig
    seed: int
    max_samples: int  # the longest waveform row the chain will see


@dataclass
class Rows:
    """The batch an op works on: N = B x V rows (row = b * V + v), B = clips x K pairs.

    view: [N] view index of each row; partners(salt): [N] row index of another clip's
    row, same view, a fresh derangement of the batch's clips per (batch key, salt, view);
    frontend: the log-mel settings.
    """

    view: torch.Tensor
    partners: Callable[[int], torch.Tensor]
    frontend: FrontendConfig


@dataclass
class RateOp(OpConfig):
    """An op that reads its input at a rate uniform in ``factor`` (> 1 = faster), so it
    needs ``factor[1]`` times its output length as input (speed, tempo)."""

    factor: list[float] = option([0.9, 1.1], "rate factor range")
    draws = 1
    ranges = {"factor": (0.25, 4.0)}

    def needed(self, out_size: int) -> int:
        return max(out_size, math.ceil((out_size - 1) * self.factor[1]) + 2)

    def positions(self, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, out_size] input positions each output sample or frame reads."""
        rate = lerp(self.factor, u[:, :1]).to(dtype)
        return torch.arange(self.out_size, device=u.device, dtype=dtype)[None, :] * rate
