"""Encoder registry: a config string -> a constructor ``(in_channels, width) -> nn.Module``.

Every encoder maps ``[N, C, F, T]`` log-mel to ``[N, embedding_dim]`` and exposes
``embedding_dim``.
"""

from __future__ import annotations

from torch import nn

from trainer.encoders.resnet import resnet18

ENCODERS = {"resnet18": resnet18}


def build_encoder(name: str, in_channels: int = 1, width: int = 64) -> nn.Module:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}': choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](in_channels=in_channels, width=width)
