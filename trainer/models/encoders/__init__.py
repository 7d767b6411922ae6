"""Encoder registry: a config string -> a constructor ``(in_channels, width) -> nn.Module``.

Every encoder maps ``[N, C, F, T]`` log-mel to ``[N, embedding_dim]`` and exposes
``embedding_dim``. ``width`` is 64 for the published sizes and smaller for CPU demos/tests:

==================  =====================================  ==================  =============
name                what                                   embedding (w = 64)  params (w=64)
==================  =====================================  ==================  =============
resnet18            ResNet-18, torchvision names           512  (8w)           11.17 M
resnet50            ResNet-50 v1.5, torchvision names      2048 (32w)          23.50 M
efficientnet_b0     EfficientNet-B0, torchvision names     1280 (width_mult    4.01 M
                    (width_mult = w / 64)                  = w / 64, x8)
vgglike             VGG-like CNN (FSDnoisy18k paper)       512  (8w)           4.69 M
crnn                3 conv blocks + BiGRU (FSDnoisy18k)    128  (2w)           0.12 M
==================  =====================================  ==================  =============

(parameter counts for 1-channel input.) ``load_pretrained`` (``trainer.models.encoders.pretrained``)
copies torchvision-named weights from a local file into resnet18/resnet50/efficientnet_b0.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from trainer.models.encoders.efficientnet import efficientnet_b0
from trainer.models.encoders.fsdnoisy import crnn, vgglike
from trainer.models.encoders.pretrained import LoadReport, load_pretrained
from trainer.models.encoders.resnet import resnet18, resnet50

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "efficientnet_b0": efficientnet_b0,
    "vgglike": vgglike,
    "crnn": crnn,
}

__all__ = ["ENCODERS", "LoadReport", "build_encoder", "load_pretrained"]


def build_encoder(name: str, in_channels: int = 1, width: int = 64) -> nn.Module:
    """Build encoder ``name``: ``[N, in_channels, F, T] -> [N, encoder.embedding_dim]``."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder '{name}': choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](in_channels=in_channels, width=width)
