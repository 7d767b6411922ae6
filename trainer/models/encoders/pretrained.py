"""Load torchvision-named weights (e.g. ImageNet ResNet-50 / EfficientNet-B0) from a local file.

``load_pretrained(encoder, "resnet50.pth")`` accepts what people actually have on disk:

- a ``.pth`` / ``.pt`` state dict, possibly wrapped as ``{"state_dict": ...}`` or
  ``{"model": ...}`` (training checkpoints) and possibly with DDP's ``module.`` prefix;
- a ``.safetensors`` file;
- an audioclr run folder (its exported ``encoder.safetensors``) or checkpoint folder
  (``step_N``: the encoder part of ``engine/weights.safetensors``, whichever engine wrote it);
- or an in-memory ``{name: tensor}`` mapping.

Classifier keys (``fc.*`` for ResNets, ``classifier.*`` for EfficientNet) are dropped: the
encoders here end at the pooled embedding. The first convolution (``conv1.weight`` /
``features.0.0.weight``, shape ``[out, in, kh, kw]``) is adapted when the file's input channels
differ from the encoder's:

- many -> 1 (RGB weights, 1-channel log-mel): sum over the input-channel axis, so a grey input
  ``x`` gives the same response as the RGB image ``(x, x, x)`` did;
- 1 -> k (e.g. 3x-replicated log-mel from 1-channel weights): repeat and divide by k, so ``k``
  identical channels give the original response.

Old torchvision files lack BN ``num_batches_tracked``; those keep the encoder's value. Anything
else that does not line up (a missing or unexpected key, a shape mismatch) raises a
``ValueError`` naming the first offending keys and the file, before any weight is changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trainer.safe_files import CheckpointError, load_tensors

CLASSIFIER_PREFIXES = ("fc.", "classifier.")
FIRST_CONV_KEYS = ("conv1.weight", "features.0.0.weight")
WRAPPER_KEYS = ("state_dict", "model")
SHOW = 5  # how many offending keys an error message lists


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: keys copied as-is, adapted (key -> how), dropped, kept, skipped."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.source}: loaded {len(self.loaded)}, adapted {self.adapted or 'none'}, "
                f"dropped {len(self.dropped)} classifier keys, kept {len(self.kept)} encoder values"
                + (f", skipped (shape) {self.skipped}" if self.skipped else ""))


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """Read a file (or take a mapping), unwrap ``state_dict``/``model`` and strip ``module.``.

    Returns ``(state, source)`` where ``source`` names the file for messages.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, source = path_or_state_dict, "<state dict>"
    else:
        path = Path(path_or_state_dict)
        source = str(path)
        encoder_only = path.is_dir() and (path / "engine" / "weights.safetensors").is_file()
        if encoder_only:
            path = path / "engine" / "weights.safetensors"
        elif path.is_dir() and (path / "encoder.safetensors").is_file():
            path = path / "encoder.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights not found: {path}" +
                                    (" (a folder without encoder.safetensors or engine/weights.safetensors)"
                                     if path.is_dir() else ""))
        if path.suffix == ".safetensors":
            try:
                state = load_file(str(path), device="cpu")
            except (OSError, SafetensorError) as err:
                raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
            if encoder_only:  # a whole model's weights: keep the encoder's
                state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        else:
            try:
                state = load_tensors(path)
            except CheckpointError as err:
                raise ValueError(str(err)) from None
    while isinstance(state, Mapping) and any(isinstance(state.get(k), Mapping) for k in WRAPPER_KEYS):
        state = next(state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping))
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: expected a state dict, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: not a state dict of tensors; non-tensor entries: {_listed(bad)}")
    return {k.removeprefix("module."): v for k, v in state.items()}, source


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str] | None:
    """``[out, c, kh, kw] -> [out, in_channels, kh, kw]``: sum when ``in_channels == 1``,
    repeat / ``in_channels`` when ``c == 1``; None when neither applies."""
    c = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True), f"summed {c} input channels -> 1"
    if c == 1:
        how = f"repeated 1 -> {in_channels} channels, divided by {in_channels}"
        return weight.repeat(1, in_channels, 1, 1) / in_channels, how
    return None


def _same_but_channels(a: torch.Size, b: torch.Size) -> bool:
    """True when two conv weight shapes ``[out, in, kh, kw]`` differ at most in ``in``."""
    return len(a) == len(b) == 4 and a[:1] + a[2:] == b[:1] + b[2:]


def _match(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: LoadReport,
           strict_shapes: bool) -> dict[str, torch.Tensor]:
    """Check ``state`` against the encoder's ``target`` state; return the dict to load."""
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = []
    out = dict(target)
    for key, value in state.items():
        if key not in target:
            continue
        want = target[key].shape
        if key in FIRST_CONV_KEYS and value.shape != want and _same_but_channels(value.shape, want):
            adapted = adapt_first_conv(value, want[1])
            if adapted is not None:
                value, report.adapted[key] = adapted
        if value.shape != want:
            mismatched.append(f"{key} (file {tuple(value.shape)} vs encoder {tuple(want)})")
            report.skipped.append(key)
            continue
        out[key] = value
        if key not in report.adapted:
            report.loaded.append(key)
    report.kept = [k for k in target if k not in state]
    problems = [f"missing keys: {_listed(missing)}" if missing else "",
                f"unexpected keys: {_listed(unexpected)}" if unexpected else "",
                f"shape mismatch: {_listed(mismatched)}" if mismatched and strict_shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"{report.source}: cannot load into the encoder; " + "; ".join(problems))
    return out


def load_pretrained(encoder: nn.Module, path_or_state_dict: str | os.PathLike | Mapping,
                    strict_shapes: bool = True) -> LoadReport:
    """Copy torchvision-named weights into ``encoder`` (in place) and report what happened.

    ``strict_shapes=False`` leaves tensors whose shape cannot be matched at the encoder's own
    initial values (listed in ``report.skipped``) instead of raising; missing or unexpected keys
    always raise. Nothing is changed in ``encoder`` when a ``ValueError`` is raised.
    """
    state, source = read_state_dict(path_or_state_dict)
    target = encoder.state_dict()
    report = LoadReport(source)
    own_classifier = {p for p in CLASSIFIER_PREFIXES if any(k.startswith(p) for k in target)}
    for key in list(state):
        if key.startswith(CLASSIFIER_PREFIXES) and not key.startswith(tuple(own_classifier)):
            report.dropped.append(key)
            del state[key]
    encoder.load_state_dict(_match(state, target, report, strict_shapes), strict=True)
    return report
