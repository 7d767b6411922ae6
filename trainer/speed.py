"""Speed settings that change how the step runs, never what it computes: cuDNN's
algorithm search and ``torch.compile`` of the encoder (``train.cudnn_benchmark``,
``train.compile``). The others live where they act: ``train.channels_last`` and
``train.precision`` in the pretrainer (its dtypes in :mod:`trainer.parallel.device`),
``optim.kernel`` in the optimizer, ``data.prefetch`` / ``data.persistent_workers`` /
``data.worker_threads`` in the loader, ``train.threads`` in :mod:`trainer.threads`."""

from __future__ import annotations

import logging

import torch
from torch import nn

from dataio.errors import ConfigError

log = logging.getLogger("audioclr.speed")

COMPILE_MODES = ("off", "auto", "on")


def set_cudnn_benchmark(enabled: bool, device: torch.device) -> None:
    """Let cuDNN time its convolution algorithms on the first batch of each shape and
    keep the fastest: every training batch has the same shape, so the search is paid once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = enabled


def wants_compile(mode: str, device: torch.device) -> bool:
    """``on`` everywhere; ``auto`` on a GPU only (on a CPU the compiled step was not faster
    and its compilation takes minutes: see docs/performance.md, "Speed settings")."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_encoder(model: nn.Module, mode: str, device: torch.device, views: torch.Tensor,
                    autocast_dtype: torch.dtype | None) -> str:
    """Compile ``model.encoder``'s forward in place (parameter names do not change, so
    checkpoints and exports are the same files), then run one forward and backward of
    ``model`` on ``views`` (zeros of the training batch's shape) so that compilation
    happens, and fails, here, before any work: ``on`` makes a failure a ConfigError (exit
    2), ``auto`` falls back to the eager encoder with a warning naming the error. Weights,
    buffers (batch-norm statistics) and gradients are as they were before the trial.
    Returns what was done, for the log."""
    if not wants_compile(mode, device):
        return "off"
    encoder = model.encoder
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    encoder.compile()
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(views)
        out["z"].float().sum().backward()
        return "compiled (torch.compile of the encoder)"
    except Exception as err:  # noqa: BLE001 -- whatever the compiler raised is reported, never a traceback
        encoder._compiled_call_impl = None  # back to the eager forward
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        if mode == "on":
            raise ConfigError(f"train.compile: torch.compile of the {type(encoder).__name__} encoder failed "
                              f"({reason}); set train.compile=off, or auto to fall back to eager by itself") from None
        log.warning("train.compile=auto: torch.compile failed (%s); training the eager encoder", reason)
        return f"eager (compile failed: {reason})"
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
