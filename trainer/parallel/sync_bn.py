"""Batch norm whose statistics cover the global batch, on any backend (gloo included).

torch's SyncBatchNorm needs a GPU; this one uses the differentiable all-reduce of
``trainer.parallel.distributed``, so two CPU processes with batch B compute exactly what one
process computes with batch 2B, forward and backward.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.parallel.distributed import all_reduce_sum_with_grad, is_initialized


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = all_reduce_sum_with_grad(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var.detach() * n / (n - 1).clamp_min(1)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized()):
            return super().forward(x)
        y = GlobalBatchNorm2d.forward(self, x[:, :, None, None])
        return y[:, :, 0, 0]


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` by its global-statistics twin (in place
    for children; returns the possibly replaced root)."""
    for cls, twin in ((nn.BatchNorm2d, GlobalBatchNorm2d), (nn.BatchNorm1d, GlobalBatchNorm1d)):
        if type(module) is cls:
            new = twin(module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats)
            new.load_state_dict(module.state_dict())
            return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_bn(child))
    return module
