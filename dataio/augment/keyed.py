"""Counter-based random numbers: every draw is a pure function of its key.

A parameter of one view is keyed on (seed, epoch, clip index, draw, view, op label): it
does not depend on the batch, rank, loader worker or device the view lands on, nor on
the chain's other ops. So one process and two ranks draw the same numbers for a clip, a
resumed run draws what the uninterrupted run drew, and adding an op shifts no other
draw. The mixer is a 32-bit integer hash (two xor-shift-multiply rounds) written as
int64 tensor arithmetic that never overflows, so the CPU and the GPU give the same bits;
it works on Python ints and on tensors alike.
"""

from __future__ import annotations

import zlib

import torch

M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul(x, c: int):
    """``(x * c) mod 2**32`` for ``x`` in [0, 2**32), in 16-bit halves (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix(x):
    """A 32-bit avalanche hash of ``x`` in [0, 2**32) (int or int64 tensor)."""
    x = x ^ (x >> 16)
    x = _mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(h, value):
    """Hash ``value`` into the running key ``h`` (ints or tensors, broadcasting)."""
    return mix(h ^ mix((value + _GOLDEN) & M32))


def label_salt(label: str) -> int:
    """A stable 32-bit number for an op's label (Python's ``hash`` differs per process)."""
    return zlib.crc32(label.encode("utf-8"))


def scalar_key(*values: int) -> int:
    """One key from a few integers, e.g. (seed, epoch) or (seed, epoch, step, rank)."""
    h = mix(0x51ED270B)
    for v in values:
        h = combine(h, int(v) & M32)
    return h


def row_keys(base: int, *columns: torch.Tensor) -> torch.Tensor:
    """Per-row keys [N] int64 from a scalar key and integer columns [N] (clip index,
    draw, view ...)."""
    h = torch.full_like(columns[0], base, dtype=torch.int64)
    for col in columns:
        h = combine(h, col.to(torch.int64) & M32)
    return h


def uniforms(keys: torch.Tensor, salt: int, count: int) -> torch.Tensor:
    """[N, count] float32 uniforms in [0, 1) (24-bit resolution) for rows keyed ``keys``."""
    k = combine(keys, salt)[:, None]
    j = torch.arange(count, device=keys.device, dtype=torch.int64)[None, :]
    return (combine(k, j) >> 8).to(torch.float32) / float(1 << 24)


def generator(key: int) -> torch.Generator:
    """A CPU generator seeded from a key (for batch-level draws such as mixing partners)."""
    return torch.Generator(device="cpu").manual_seed(int(key))
