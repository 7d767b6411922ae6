"""Two gloo ranks with batch B == one process with batch 2B: loss and every gradient,
for every objective (global negatives, global batch norm, sharded queue and bank)."""

from types import SimpleNamespace

import pytest
import torch

from tests.dist_utils import run_workers

pytestmark = pytest.mark.e2e

B = 4


def _setup(name: str, rank: int, world: int):
    from trainer.models.encoders import build_encoder
    from trainer.objectives import ObjectiveContext, build_objective
    from trainer.parallel.sync_bn import convert_global_bn
    from trainer.train.config import ModelConfig, ObjectiveConfig

    torch.manual_seed(0)
    cfg = ObjectiveConfig(name=name, temperature=0.2, cola_dim=16, queue_size=32, nce_noise=6, momentum=0.9)
    obj = build_objective(cfg, ModelConfig(proj_hidden=16, proj_dim=8),
                          ObjectiveContext(rank=rank, world_size=world, num_classes=3, num_clips=2 * B,
                                           num_views=_views(name)))
    enc = build_encoder("resnet18", in_channels=1, width=4)
    model = convert_global_bn(obj.build_model(enc)).double()
    obj.attach(model)
    return obj, model


def _views(name: str) -> int:
    return 3 if name == "looc" else 2


def _batch(rank: int, world: int, name: str):
    g = torch.Generator().manual_seed(1)
    views = torch.randn(2 * B, _views(name), 1, 16, 24, generator=g, dtype=torch.float64)
    labels, indices = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0]), torch.arange(2 * B)
    part = slice(rank * (2 * B // world), (rank + 1) * (2 * B // world))
    return SimpleNamespace(views=views[part], labels=labels[part], indices=indices[part])


def _loss_and_grads(rank: int, world: int, name: str):
    from trainer.parallel import distributed
    from trainer.parallel.ddp_engine import DDPEngine

    obj, model = _setup(name, rank, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = DDPEngine(model, opt, sched, torch.device("cpu"), None)
    batch = _batch(rank, world, name)
    loss = obj.loss(engine.forward(obj.model_views(batch.views)), batch)
    engine.backward(loss)
    mean_loss = distributed.reduce_mean({"loss": loss.item()}, torch.device("cpu"))["loss"]
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in engine.module.named_buffers() if "running" in n}
    return mean_loss, grads, stats


OBJECTIVES = ["simclr", "looc", "cola", "supcon", "hybrid", "moco", "npid"]


def _every_objective(rank: int, world: int) -> dict:
    return {name: _loss_and_grads(rank, world, name) for name in OBJECTIVES}


@pytest.fixture(scope="module")
def launches() -> dict:
    """Every objective in one process and on two ranks: one launch each (a launch's start
    costs far more than an objective's step): {1: [rank 0], 2: [rank 0, rank 1]}."""
    return {world: run_workers(_every_objective, world) for world in (1, 2)}


@pytest.mark.parametrize("name", OBJECTIVES)
def test_two_ranks_equal_one_process_with_the_global_batch(launches, name):
    loss1, grads1, stats1 = launches[1][0][name]
    for loss2, grads2, stats2 in (rank[name] for rank in launches[2]):
        assert abs(loss2 - loss1) < 1e-5
        assert grads2.keys() == grads1.keys() and len(grads1) > 20
        for key, g in grads1.items():
            assert torch.allclose(grads2[key], g, atol=1e-5, rtol=0), key
        for key, s in stats1.items():
            assert torch.allclose(stats2[key], s, atol=1e-6), key
    # the test can fail: local negatives only, or a 1/world_size gradient, would change these
    assert any(g.abs().max() > 1e-4 for g in grads1.values())
