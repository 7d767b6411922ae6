"""The two small encoders of the FSDnoisy18k experiments (Fonseca et al., ICASSP 2019):
a VGG-like CNN and a CRNN, written from the papers' description, sizes scaled by ``width``.

Both map ``[N, C, F, T]`` log-mel to ``[N, embedding_dim]``. The papers give the families
(stacked 3x3 conv-BN-ReLU with max-pooling; a few conv blocks pooling over frequency followed by
a bidirectional GRU), not every size, so the exact layer lists below are our choice, in that
spirit; ``width`` (64 = the sizes listed) scales every channel count and the GRU size.

VGG-like, ``w = width``, embedding ``8 * w`` (512 at width 64)::

    blocks.0: conv3x3(C, w)   BN ReLU, conv3x3(w, w)     BN ReLU, max-pool 2x2
    blocks.1: conv3x3(w, 2w)  BN ReLU, conv3x3(2w, 2w)   BN ReLU, max-pool 2x2
    blocks.2: conv3x3(2w, 4w) BN ReLU, conv3x3(4w, 4w)   BN ReLU, max-pool 2x2
    blocks.3: conv3x3(4w, 8w) BN ReLU, conv3x3(8w, 8w)   BN ReLU, max-pool 2x2
    global average pool over frequency and time -> [N, 8w]

CRNN, embedding ``2 * w`` (128 at width 64)::

    blocks.0: conv3x3(C, w) BN ReLU, max-pool (F 4, T 2)
    blocks.1: conv3x3(w, w) BN ReLU, max-pool (F 4, T 1)
    blocks.2: conv3x3(w, w) BN ReLU, max-pool (F 2, T 1)
    max over the remaining frequency bins -> [N, T/2, w]
    gru: bidirectional GRU, hidden w per direction -> [N, T/2, 2w]
    mean over time -> [N, 2w]

Pooling windows are clipped to the remaining size (ceil mode), so short or narrow inputs
(e.g. 32 mel bands in tests) still run; the CRNN's final max over frequency makes its GRU
input size independent of the number of mel bands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ClippedMaxPool(nn.Module):
    """Max-pool with window = stride = ``(pool_f, pool_t)``, clipped to the input size (ceil mode).

    ``[N, C, F, T] -> [N, C, ceil(F / pool_f), ceil(T / pool_t)]`` (for F >= pool_f; else F -> 1).
    """

    def __init__(self, pool_f: int, pool_t: int):
        super().__init__()
        self.pool = (pool_f, pool_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (min(self.pool[0], x.shape[-2]), min(self.pool[1], x.shape[-1]))
        return F.max_pool2d(x, kernel, stride=kernel, ceil_mode=True)


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class VGGLike(nn.Module):
    """VGG-like CNN (layer list in the module docstring): ``[N, C, F, T] -> [N, 8 * width]``."""

    def __init__(self, in_channels: int = 1, width: int = 64, num_blocks: int = 4):
        super().__init__()
        blocks, cin = [], in_channels
        for i in range(num_blocks):
            cout = width * 2 ** i
            blocks.append(nn.Sequential(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout),
                                        ClippedMaxPool(2, 2)))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.embedding_dim = cin
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, F, T]`` log-mel -> ``[N, embedding_dim]``."""
        return self.blocks(x).mean(dim=(-2, -1))


class CRNN(nn.Module):
    """Conv blocks pooling mostly over frequency, then a bidirectional GRU over time.

    ``[N, C, F, T] -> [N, 2 * width]`` (layer list in the module docstring).
    """

    POOLS: tuple[tuple[int, int], ...] = ((4, 2), (4, 1), (2, 1))

    def __init__(self, in_channels: int = 1, width: int = 64, hidden: int | None = None):
        super().__init__()
        blocks, cin = [], in_channels
        for pool_f, pool_t in self.POOLS:
            blocks.append(nn.Sequential(*_conv_bn_relu(cin, width), ClippedMaxPool(pool_f, pool_t)))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        hidden = hidden or width
        self.gru = nn.GRU(width, hidden, batch_first=True, bidirectional=True)
        self.embedding_dim = 2 * hidden
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, F, T]`` log-mel -> ``[N, embedding_dim]``."""
        maps = self.blocks(x)                           # [N, width, F', T']
        frames = maps.amax(dim=-2).transpose(1, 2)      # [N, T', width]
        seq, _ = self.gru(frames.contiguous())          # [N, T', 2 * hidden]
        return seq.mean(dim=1)


def vgglike(in_channels: int = 1, width: int = 64) -> VGGLike:
    """VGG-like encoder: ``[N, in_channels, F, T] -> [N, 8 * width]`` (512 at width 64)."""
    return VGGLike(in_channels=in_channels, width=width)


def crnn(in_channels: int = 1, width: int = 64) -> CRNN:
    """CRNN encoder: ``[N, in_channels, F, T] -> [N, 2 * width]`` (128 at width 64)."""
    return CRNN(in_channels=in_channels, width=width)
