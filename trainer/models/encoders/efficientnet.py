"""EfficientNet-B0 (COLA's encoder) for log-mel input, with torchvision's parameter names.

Layout of ``features`` (what torchvision's ``efficientnet_b0`` calls its trunk):

- ``features.0``: stem, 3x3/2 conv (``.0``) + BN (``.1``) + SiLU, 32 channels.
- ``features.1`` .. ``features.7``: the seven MBConv stages below; block ``j`` of stage ``i``
  is ``features.i.j.block``: ``[expand 1x1 conv-BN-SiLU]`` (only when expand ratio > 1),
  depthwise kxk conv-BN-SiLU, squeeze-excitation (``fc1``/``fc2``, 1x1 convs with bias),
  projection 1x1 conv-BN (no activation). The index of each part shifts by one when there is
  no expansion, as in torchvision (``features.1.0.block.0`` is the depthwise conv there).
- ``features.8``: head, 1x1 conv-BN-SiLU to 1280 channels; global average pool -> 1280-d.

So ``features.0.0.weight``, ``features.1.0.block.1.fc1.weight``, ``features.8.0.weight`` ...
line up with torchvision's keys, and a state dict saved with that naming loads (minus
``classifier``). Stochastic depth is implemented as in the paper (drop probability growing
linearly from 0 to ``stochastic_depth`` over the blocks, 0.2 for B0, active only in training).

``width`` follows the registry's convention: ``width_mult = width / 64`` (64 = the published
B0), every channel count is scaled and rounded to a multiple of 8; depth is never scaled.
"""

from __future__ import annotations

import torch
from torch import nn

# (expand ratio, kernel, stride, input channels, output channels, repeats) per stage of B0
B0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``), never more than 10% below ``channels``."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """Conv (``.0``, no bias) + BN (``.1``) + optional SiLU (``.2``); 'same' padding for odd kernels."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel gating: ``x * sigmoid(fc2(silu(fc1(mean_FT(x)))))``, ``[N, C, F, T]`` -> same shape."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean(dim=(-2, -1), keepdim=True))))
        return x * torch.sigmoid(gate)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``p`` and rescale the rest by 1/(1-p)."""
    if not training or p == 0.0:
        return x
    keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class MBConv(nn.Module):
    """Inverted residual with SE: ``[N, cin, F, T] -> [N, cout, F/stride, T/stride]``."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop: float = 0.0):
        super().__init__()
        hidden = round_channels(cin * expand) if expand != 1 else cin
        parts: list[nn.Module] = []
        if expand != 1:
            parts.append(_conv_bn(cin, hidden, 1))
        parts += [_conv_bn(hidden, hidden, kernel, stride, groups=hidden),
                  SqueezeExcite(hidden, max(1, cin // 4)),
                  _conv_bn(hidden, cout, 1, act=False)]
        self.block = nn.Sequential(*parts)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.residual:
            out = x + drop_path(out, self.drop, self.training)
        return out


class EfficientNet(nn.Module):
    """EfficientNet trunk: ``[N, in_channels, F, T]`` log-mel -> ``[N, embedding_dim]``.

    F and T shrink 32x before the global average pool; ``embedding_dim`` is 1280 at width_mult 1.
    """

    def __init__(self, stages: tuple[tuple[int, int, int, int, int, int], ...] = B0_STAGES,
                 in_channels: int = 1, width_mult: float = 1.0, stochastic_depth: float = 0.2):
        super().__init__()
        scale = lambda c: round_channels(c * width_mult)  # noqa: E731
        layers: list[nn.Module] = [_conv_bn(in_channels, scale(stages[0][3]), 3, stride=2)]
        total, done = sum(s[5] for s in stages), 0
        for expand, kernel, stride, cin, cout, repeats in stages:
            blocks = []
            for r in range(repeats):
                blocks.append(MBConv(scale(cin) if r == 0 else scale(cout), scale(cout), expand, kernel,
                                     stride if r == 0 else 1, drop=stochastic_depth * done / total))
                done += 1
            layers.append(nn.Sequential(*blocks))
        self.embedding_dim = 4 * scale(stages[-1][4])
        layers.append(_conv_bn(scale(stages[-1][4]), self.embedding_dim, 1))
        self.features = nn.Sequential(*layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, F, T]`` log-mel -> ``[N, embedding_dim]``."""
        return torch.flatten(self.features(x).mean(dim=(-2, -1)), 1)


def efficientnet_b0(in_channels: int = 1, width: int = 64) -> EfficientNet:
    """EfficientNet-B0 with ``width_mult = width / 64``: ``[N, in_channels, F, T] -> [N, 1280]`` at width 64."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return EfficientNet(B0_STAGES, in_channels=in_channels, width_mult=width / 64)
