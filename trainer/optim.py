"""Optimizers (SGD with momentum, LARS, AdamW) and the learning-rate schedules: linear
warm-up, then cosine, step decay at milestone epochs, or exponential decay per epoch."""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Each parameter's step is scaled by ``eta * |w| / (|g| + wd * |w|)``; groups with
    ``lars_exclude=True`` (biases, norm layers) take plain SGD steps without weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of convolutions and linear layers decay (and are LARS-adapted);
    biases and normalisation parameters do not."""
    decay, plain = [], []
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            (plain if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": plain, "weight_decay": 0.0, "lars_exclude": True}]


def _sgd(groups: list[dict], lr: float, momentum: float, eta: float, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, **({"fused": True} if fused else {}))


def _lars(groups: list[dict], lr: float, momentum: float, eta: float, fused: bool) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=momentum, eta=eta)


def _adamw(groups: list[dict], lr: float, momentum: float, eta: float, fused: bool) -> torch.optim.Optimizer:
    """COLA's recipe (Adam); ``momentum`` is beta1."""
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


OPTIMIZERS = {"sgd": _sgd, "lars": _lars, "adamw": _adamw}


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float,
                    weight_decay: float, lars_eta: float, fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: PyTorch's one-kernel update, for sgd (AdamW's fused CPU kernel drifted
    from the plain one in a 3-step test; LARS has none)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")
    if fused and name != "sgd":
        raise ValueError(f"optim.kernel: fused is for sgd only, not {name}")
    groups = param_groups(model, weight_decay)
    if name != "lars":
        for g in groups:
            g.pop("lars_exclude")
    return OPTIMIZERS[name](groups, lr, momentum, lars_eta, fused)


def warmup_cosine(step: int, warmup: int, total: int, final_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear from ~0 to 1 over ``warmup`` steps, then cosine
    to ``final_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = ("cosine", "step", "exponential", "constant")


def lr_multiplier(step: int, *, schedule: str, warmup: int, total: int, steps_per_epoch: int,
                  final_ratio: float = 0.0, milestones: tuple = (), decay: float = 0.1) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up over
    ``warmup`` steps, then ``cosine`` to ``final_ratio`` at ``total``; ``step``: times
    ``decay`` at each milestone epoch passed (Fonseca et al.: 0.1 at 325 and 425);
    ``exponential``: times ``decay`` per epoch after the warm-up (SoundCLR: 0.98);
    ``constant``: the peak throughout."""
    if schedule == "cosine" or step < warmup:
        return warmup_cosine(step, warmup, total, final_ratio)
    if schedule == "constant":
        return 1.0
    epoch = step / steps_per_epoch
    if schedule == "step":
        return decay ** sum(epoch >= m for m in milestones)
    return decay ** ((step - warmup) // steps_per_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, final_ratio: float = 0.0, *,
                    schedule: str = "cosine", steps_per_epoch: int = 1, milestones: tuple = (),
                    decay: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}': choose one of {', '.join(SCHEDULES)}")
    kwargs = dict(schedule=schedule, warmup=warmup, total=total, steps_per_epoch=max(1, steps_per_epoch),
                  final_ratio=final_ratio, milestones=tuple(milestones), decay=decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, **kwargs))
