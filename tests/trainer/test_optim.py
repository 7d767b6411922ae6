import math

import pytest
import torch

from trainer.optim import LARS, build_optimizer, param_groups, warmup_cosine


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, final_ratio=0.1) == pytest.approx(0.1)


def test_lars_step_follows_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5, eta=0.01)
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([3.0, 4.0])
    trust = 0.01 * 5.0 / float(torch.linalg.vector_norm(d))
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * d)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))


def test_biases_and_norms_do_not_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay, plain = param_groups(model, 1e-4)
    assert len(decay["params"]) == 1 and len(plain["params"]) == 3 and plain["weight_decay"] == 0
    assert isinstance(build_optimizer("sgd", model, 0.1, 0.9, 1e-4, 0.001), torch.optim.SGD)
    adam = build_optimizer("adamw", model, 1e-3, 0.9, 1e-4, 0.001)
    assert isinstance(adam, torch.optim.AdamW) and adam.param_groups[1]["weight_decay"] == 0
    assert not math.isnan(build_optimizer("lars", model, 0.1, 0.9, 1e-4, 0.001).param_groups[0]["lr"])


def test_step_and_exponential_schedules():
    from trainer.optim import lr_multiplier

    step = dict(schedule="step", warmup=0, total=500, steps_per_epoch=10, milestones=(32.5, 42.5), decay=0.1)
    assert [lr_multiplier(s, **step) for s in (0, 324, 325, 424, 425, 499)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    expo = dict(schedule="exponential", warmup=20, total=500, steps_per_epoch=10, decay=0.98)
    assert lr_multiplier(9, **expo) == pytest.approx(0.5)
    assert [lr_multiplier(s, **expo) for s in (20, 29, 30, 120)] == pytest.approx([1, 1, 0.98, 0.98 ** 10])


def test_the_fused_update_steps_as_the_plain_one():
    from trainer.optim import build_optimizer

    for name in ("sgd",):
        runs = []
        for fused in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
            opt = build_optimizer(name, model, 0.05, 0.9, 1e-4, 0.001, fused=fused)
            for step in range(3):
                torch.manual_seed(step)
                model(torch.randn(16, 6)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            runs.append([p.detach().clone() for p in model.parameters()])
        for a, b in zip(*runs):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_fused_for_another_optimizer_is_refused_naming_the_key():
    from dataio.errors import ConfigError
    from trainer.train.config import PretrainConfig, load_config

    for name in ("lars", "adamw"):
        with pytest.raises(ConfigError, match=f"optim.kernel: fused is for sgd only, not {name}"):
            load_config(PretrainConfig, None, ["data.shards=x", f"optim.name={name}", "optim.kernel=fused"])
