import math

import torch
import torch.nn.functional as F

from trainer.objectives.ntxent import nt_xent


def slow_nt_xent(z: torch.Tensor, temperature: float) -> float:
    """Explicit loop over anchors, float64: z [N, V, D] normalised."""
    n, v, _ = z.shape
    flat = [(i, a) for a in range(v) for i in range(n)]
    z = z.double()
    total, count = 0.0, 0
    for i, a in flat:
        anchor = z[i, a]
        denom = sum(math.exp(float(anchor @ z[j, b]) / temperature) for j, b in flat if (j, b) != (i, a))
        for b in range(v):
            if b == a:
                continue
            total += -(float(anchor @ z[i, b]) / temperature - math.log(denom))
            count += 1
    return total / count


def test_matches_slow_reference_two_and_three_views():
    torch.manual_seed(0)
    for v in (2, 3):
        z = F.normalize(torch.randn(6, v, 5), dim=-1)
        got = nt_xent(z, z, 0, temperature=0.3)
        assert got.dtype == torch.float32
        assert abs(float(got) - slow_nt_xent(z, 0.3)) < 1e-5


def test_rank_slices_average_to_the_global_loss():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(8, 2, 4), dim=-1)
    per_rank = [nt_xent(z[r * 4:(r + 1) * 4], z, r, temperature=0.2) for r in range(2)]
    assert abs(float(sum(per_rank) / 2) - slow_nt_xent(z, 0.2)) < 1e-5


def test_bf16_inputs_give_float32_loss():
    z = F.normalize(torch.randn(4, 2, 8), dim=-1).bfloat16()
    assert nt_xent(z, z, 0, temperature=0.1).dtype == torch.float32


def test_loss_falls_under_sgd():
    torch.manual_seed(2)
    x = torch.randn(16, 8)
    net = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        views = torch.stack([x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)], 1)
        z = F.normalize(net(views), dim=-1)
        loss = nt_xent(z, z, 0, temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


def test_logits_are_float32_under_autocast():
    z = F.normalize(torch.randn(4, 2, 8), dim=-1)
    want = nt_xent(z, z, 0, temperature=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent(z, z, 0, temperature=0.1)
    assert got.dtype == torch.float32 and abs(float(got) - float(want)) < 1e-6


def test_row_blocks_add_up_to_the_loss():
    z = F.normalize(torch.randn(5, 3, 4), dim=-1)
    whole = nt_xent(z, z, 0, temperature=0.3)
    parts = [nt_xent(z, z, 0, temperature=0.3, rows=slice(i, i + 4)) for i in range(0, 15, 4)]
    assert abs(float(sum(parts)) - float(whole)) < 1e-6
