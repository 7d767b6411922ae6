"""Gradient caching gives the parameter gradients of the plain large batch."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainer.models.heads import ContrastiveModel, LinearProjection
from trainer.objectives import ObjectiveContext, build_objective
from trainer.parallel.gradcache import GradCache
from trainer.train.config import ModelConfig, ObjectiveConfig


class TinyEncoder(nn.Module):
    """A conv encoder without batch norm (chunk statistics would differ from the batch's)."""

    embedding_dim = 12

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 12, 3), nn.ReLU())

    def forward(self, x):
        return self.net(x).mean(dim=(-2, -1))


def _setup(name):
    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(name=name, temperature=0.3, cola_dim=8), ModelConfig(proj_dim=6),
                          ObjectiveContext(num_classes=3, num_clips=16))
    enc = TinyEncoder()
    # SimCLR's MLP head has batch norm (chunk statistics): a linear head here
    head = LinearProjection(enc.embedding_dim, 6) if name == "simclr" else obj.make_head(enc.embedding_dim)
    model = ContrastiveModel(enc, head, obj.make_parts(enc.embedding_dim)).double()
    obj.attach(model)
    g = torch.Generator().manual_seed(1)
    views = torch.randn(16, 2, 1, 12, 14, generator=g, dtype=torch.float64)
    batch = SimpleNamespace(views=views, labels=torch.arange(16) % 3, indices=torch.arange(16))
    return obj, model, batch


def _grads(model, obj):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["simclr", "cola", "supcon", "hybrid"])
def test_chunked_gradients_equal_the_whole_batch(name):
    obj, model, batch = _setup(name)
    loss = obj.loss(model(batch.views), batch)
    loss.backward()
    want = _grads(model, obj)

    obj, model, batch = _setup(name)
    cache = GradCache(model, batch.views, 5, accumulating=contextlib.nullcontext)  # 5+5+5+1 clips
    cached_loss = obj.loss_backward(cache.outputs(), batch, 3)  # NT-Xent: 3 clips' rows of logits a time
    cache.backward()
    got = _grads(model, obj)
    assert abs(float(cached_loss) - float(loss)) < 1e-5
    assert want.keys() == got.keys() and len(want) >= 6
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), key
