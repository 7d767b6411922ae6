"""Which device a command runs on, and in which precision it computes there."""

from __future__ import annotations

import torch

from dataio.errors import ConfigError


def pick_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device (``auto``: CUDA when one is visible); a
    ConfigError naming ``key`` when CUDA is asked for and absent. On CUDA the process's
    current device becomes ``local_rank``."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: 'cuda' asked for but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast
    speeds convolutions up instead of emulating them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _native_bf16(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16()) else None


# train.precision: the autocast dtype each setting picks on a device (None: fp32)
PRECISIONS = {
    "auto": lambda device: torch.bfloat16 if device.type == "cuda" else None,
    "fast": _native_bf16,
    "fp32": lambda device: None,
    "bf16": lambda device: torch.bfloat16,
}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` on ``device``: the autocast dtype, or None for fp32."""
    return PRECISIONS[precision](device)
