"""Augmentations of the published systems, as one keyed, batched chain.

The ``augment:`` section of a recipe is an ordered mapping ``name -> settings``; the
name is the op unless the entry says ``op:`` (so one op can appear twice). Waveform ops
come first, then the log-mel is computed, then log-mel ops::

    augment:
      speed: {p: 0.5, factor: [0.9, 1.1]}
      rrc: {time_scale: [0.6, 1.0], freq_scale: [0.6, 1.0]}
      time_mask: {count: [1, 2], width: [0, 20]}

``augment.rrc.p=0`` turns an entry off from the command line, ``augment.rrc=null``
removes it. Every key is checked before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib

from dataio.augment.base import OpConfig
from dataio.augment.chain import Augmenter, BatchIds
from dataio.augment.mel import MEL_OPS
from dataio.augment.wave import WAVE_OPS
from dataio.errors import ConfigError
from dataio.formats import clip_format as format_named
from dataio.schema import build_section, describe

OPS: dict[str, type[OpConfig]] = {**WAVE_OPS, **MEL_OPS}

__all__ = ["OPS", "Augmenter", "BatchIds", "build_augmenter", "describe_ops", "parse_chain"]


def parse_chain(section: dict | None) -> list[OpConfig]:
    """The validated ops of an ``augment:`` section, in order (entries set to null are
    left out). Raises ConfigError naming ``augment.<name>.<key>``."""
    ops: list[OpConfig] = []
    for label, settings in (section or {}).items():
        if settings is None:
            continue
        key = f"augment.{label}"
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}: expected a mapping of the op's settings, got {settings!r}")
        name = settings.get("op") or label
        if name not in OPS:
            near = difflib.get_close_matches(str(name), list(OPS), n=1)
            maybe = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{key}: unknown op '{name}'{maybe}; the ops are {', '.join(OPS)}")
        op = build_section(OPS[name], {**settings, "op": name}, key + ".")
        op.label = label
        if ops and ops[-1].domain == "mel" and op.domain == "wave":
            raise ConfigError(f"{key}: waveform op '{name}' comes after log-mel op '{ops[-1].label}' in the chain "
                              f"({', '.join(str(k) for k in section)}); list the waveform ops first (they run "
                              f"before the log-mel). Over a base: recipe an op the recipe adds goes after the "
                              f"base's ops unless the recipe also names an op it comes before")
        ops.append(op)
    return ops


def on_logmel(ops: list[OpConfig]) -> list[OpConfig]:
    """The chain for a logmel corpus: ``gain`` becomes a dB offset, ``reverse`` reversed
    frames, ``polarity`` nothing (a log-mel cannot hear the sign); any other waveform op
    (mix-back, noise, speed, room IRs, trim, shift) cannot run on a stored log-mel and is
    refused, naming it."""
    out = []
    for op in ops:
        if op.domain == "wave":
            if not hasattr(op, "logmel_form"):
                raise ConfigError(f"augment.{op.label}: waveform op '{op.op}' cannot run on a logmel corpus "
                                  f"(clip_format logmel: its clips are stored as log-mels, not audio); train "
                                  f"from a flac or pcm16 corpus, or leave the op out (augment.{op.label}=null)")
            converted = op.logmel_form()
            converted.label = op.label
            op = converted
        out.append(op)
    return out


def build_augmenter(section: dict | None, frontend, view_seconds: float, *, num_views: int,
                    pairs_per_clip: int, seed: int, clip_format: str = "flac") -> Augmenter:
    """The run's :class:`Augmenter` (an empty chain when ``section`` is empty); on a
    corpus of log-mels (a mel clip format) the chain runs on them (:func:`on_logmel`)."""
    view_samples = int(round(view_seconds * frontend.sample_rate))
    ops = parse_chain(section)
    if not format_named(clip_format).is_wave:
        ops = on_logmel(ops)
    return Augmenter(ops, frontend, view_samples, num_views=num_views, pairs_per_clip=pairs_per_clip, seed=seed)


def describe_ops() -> list[str]:
    """Every op with its settings, for ``--help-config``."""
    lines = ["", "augment ops (augment.NAME.KEY; waveform ops first, then log-mel ops):"]
    for name, cls in OPS.items():
        doc = " ".join((cls.__doc__ or "").split())
        lines.append(f"  {name} [{cls.domain}]: {doc}")
        common = {f.name for f in dataclasses.fields(OpConfig)}
        for line in describe(cls, "    "):
            if line.strip().split(" ")[0] not in common:
                lines.append(line)
    lines.append("  every op also takes: " + "; ".join(
        f"{f.name} ({f.metadata['doc']})" for f in dataclasses.fields(OpConfig) if f.name != "op"))
    return lines


