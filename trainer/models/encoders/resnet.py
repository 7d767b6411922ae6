"""ResNet encoders for log-mel input, with torchvision's parameter names.

``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer1.0.downsample.0/1`` match torchvision's
ResNet, so a state dict saved with that naming loads (minus ``fc``, see
``trainer.models.encoders.pretrained``). Input ``[N, C, F, T]`` (C = 1 log-mel channel by default,
3 for ImageNet-style replicated log-mel), output ``[N, embedding_dim]`` after global average
pooling over frequency and time.

- ResNet-18: ``BasicBlock`` (two 3x3 convs), layers (2, 2, 2, 2), embedding ``8 * width``.
- ResNet-50: ``Bottleneck`` (1x1 reduce, 3x3, 1x1 expand by 4), layers (3, 4, 6, 3),
  embedding ``32 * width`` (2048 at the published width 64). The stride sits on the 3x3 conv
  (the "v1.5" variant torchvision ships), not on the first 1x1.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class StridedPointwise(nn.Conv2d):
    """A strided 1x1 convolution (the shortcut's projection). On a CPU with channels-last
    input it reads every ``stride``-th position first and convolves those at stride 1: the
    same numbers, but oneDNN's own strided 1x1 backward corrupts the heap for inputs of
    fewer than 8 channels on some CPUs (found on an AVX2 AMD EPYC with torch 2.11: a width-4
    ResNet-18 aborted with "double free or corruption"; tests/trainer/models/test_encoders.py keeps it out)."""

    def forward(self, x):
        s = self.stride
        if x.device.type == "cpu" and s != (1, 1) and x.is_contiguous(memory_format=torch.channels_last):
            return nn.functional.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias)
        return super().forward(x)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    if stride != 1:
        return StridedPointwise(cin, cout, 1, stride=stride, bias=False)
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """Projection for the residual path (``downsample.0`` conv, ``downsample.1`` BN), or None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus identity: ``[N, cin, F, T] -> [N, width, F/s, T/s]``."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand: ``[N, cin, F, T] -> [N, 4 * width, F/s, T/s]``."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk: stem (7x7/2 conv, 3x3/2 max-pool), four stages, global average pool.

    ``width`` is the first stage's inner channel count (64 in the paper; smaller for CPU
    demos). ``[N, in_channels, F, T] -> [N, embedding_dim]``; F and T shrink 32x before pooling.
    """

    def __init__(self, layers: tuple[int, ...], in_channels: int = 1, width: int = 64,
                 block: type[BasicBlock] | type[Bottleneck] = BasicBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        for i, blocks in enumerate(layers):
            inner, stride = width * 2 ** i, 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(cin, inner, stride if b == 0 else 1))
                cin = inner * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.embedding_dim = cin
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: blocks start as identity
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, F, T]`` log-mel -> ``[N, embedding_dim]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(x.mean(dim=(-2, -1)), 1)


def resnet18(in_channels: int = 1, width: int = 64) -> ResNet:
    """ResNet-18: ``[N, in_channels, F, T] -> [N, 8 * width]`` (512 at width 64)."""
    return ResNet((2, 2, 2, 2), in_channels=in_channels, width=width, block=BasicBlock)


def resnet50(in_channels: int = 1, width: int = 64) -> ResNet:
    """ResNet-50 (v1.5): ``[N, in_channels, F, T] -> [N, 32 * width]`` (2048 at width 64)."""
    return ResNet((3, 4, 6, 3), in_channels=in_channels, width=width, block=Bottleneck)
