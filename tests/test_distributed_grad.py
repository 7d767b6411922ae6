"""Two gloo ranks with batch B == one process with batch 2B: loss and every gradient."""

import torch

from tests.dist_utils import run_workers

B = 4


def _model():
    from trainer.encoders import build_encoder
    from trainer.heads import ContrastiveModel, ProjectionHead
    from trainer.sync_bn import convert_global_bn

    torch.manual_seed(0)
    enc = build_encoder("resnet18", in_channels=1, width=4)
    model = convert_global_bn(ContrastiveModel(enc, ProjectionHead(enc.embedding_dim, 16, 8)))
    return model.double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, 2, 1, 16, 24, generator=g, dtype=torch.float64)


def _loss_and_grads(rank: int, world: int):
    from trainer import distributed
    from trainer.engine import DDPEngine
    from trainer.objectives import SimCLR

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = DDPEngine(model, opt, sched, torch.device("cpu"), None)
    views = _data()[rank * (2 * B // world):(rank + 1) * (2 * B // world)]
    z = engine.forward(views)
    loss = SimCLR(temperature=0.2, rank=rank).loss(z)
    engine.backward(loss)
    mean_loss = distributed.reduce_mean({"loss": loss.item()}, torch.device("cpu"))["loss"]
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
    stats = {n: b.clone() for n, b in engine.module.named_buffers() if "running" in n}
    return mean_loss, grads, stats


def test_two_ranks_equal_one_process_with_the_global_batch():
    single = run_workers(_loss_and_grads, 1)[0]
    ranks = run_workers(_loss_and_grads, 2)
    loss1, grads1, stats1 = single
    for loss2, grads2, stats2 in ranks:
        assert abs(loss2 - loss1) < 1e-5
        assert grads2.keys() == grads1.keys() and len(grads1) > 20
        for name, g in grads1.items():
            assert torch.allclose(grads2[name], g, atol=1e-5, rtol=0), name
        for name, s in stats1.items():
            assert torch.allclose(stats2[name], s, atol=1e-6), name
    # the test can fail: local negatives only would change the loss
    assert any(g.abs().max() > 1e-4 for g in grads1.values())
