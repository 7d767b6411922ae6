"""COLA, SupCon/hybrid, MoCo and NPID losses against slow float64 references (explicit
loops), and each falls under a few SGD steps. One process: the collective helpers
answer as for a world of one."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.objectives.cola import Bilinear, ColaHead, cola_projected_loss, project
from trainer.objectives.moco import ShardedQueue, moco_logits_loss
from trainer.objectives.npid import ShardedMemoryBank, npid_exact_loss, npid_nce_loss
from trainer.objectives.supcon import classification_loss, hybrid_loss, label_affinity, supcon_loss
from trainer.parallel import distributed


def cola_loss(anchors, candidates, weight, rank):
    """COLA's loss from the anchors themselves: a^T W, then the projected loss."""
    return cola_projected_loss(project(anchors, weight), candidates, rank)


def _falls(losses: list[float], by: float = 0.05) -> bool:
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - by


# ---------------------------------------------------------------- COLA

def slow_cola(anchors, candidates, weight, rank) -> float:
    a, c, w = anchors.double().tolist(), candidates.double().tolist(), weight.double().tolist()
    d = len(w)
    total = 0.0
    for i, ai in enumerate(a):
        sims = [sum(ai[p] * w[p][q] * cj[q] for p in range(d) for q in range(d)) for cj in c]
        total += math.log(sum(math.exp(s) for s in sims)) - sims[rank * len(a) + i]
    return total / len(a)


def test_cola_matches_slow_reference_for_every_rank():
    torch.manual_seed(0)
    cands, weight = torch.randn(6, 4).tanh(), torch.eye(4) + 0.3 * torch.randn(4, 4)
    for rank in range(2):
        anchors = torch.randn(3, 4).tanh()
        got = cola_loss(anchors, cands, weight, rank)
        assert got.dtype == torch.float32
        assert abs(float(got) - slow_cola(anchors, cands, weight, rank)) < 1e-5
    # W = 1: in-batch negatives, the positive on the diagonal
    anchors = torch.randn(6, 4).tanh()
    assert abs(float(cola_loss(anchors, cands, weight, 0)) - slow_cola(anchors, cands, weight, 0)) < 1e-5


def test_cola_modules_and_bf16():
    head, bil = ColaHead(8, 5), Bilinear(5)
    out = head(torch.randn(3, 8))
    assert out.shape == (3, 5) and out.abs().max() < 1
    assert torch.equal(bil.weight.data, torch.eye(5))
    assert torch.allclose(bil(out) @ out.T, out @ out.T)
    assert cola_loss(out.bfloat16(), out.bfloat16(), bil.weight, 0).dtype == torch.float32


def test_cola_falls_under_sgd():
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    head, bil = ColaHead(8, 8), Bilinear(8)
    opt = torch.optim.SGD([*head.parameters(), *bil.parameters()], lr=0.1)
    losses = []
    for _ in range(30):
        a, c = head(x + 0.3 * torch.randn_like(x)), head(x + 0.3 * torch.randn_like(x))
        loss = cola_loss(a, c, bil.weight, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert _falls(losses)


# ---------------------------------------------------------------- SupCon

def _label_sets(labels: torch.Tensor) -> list[set]:
    if labels.ndim == 1:
        return [set() if int(c) < 0 else {int(c)} for c in labels]
    return [{c for c, x in enumerate(row) if x > 0} for row in labels.tolist()]


def slow_supcon(z, labels, temperature, overlap_weighting=False) -> float:
    """Single-process L_out over all N*V anchors of z [N, V, D]."""
    n, v, _ = z.shape
    sets, z = _label_sets(labels), z.double()
    views = [(i, a) for i in range(n) for a in range(v)]
    total, count = 0.0, 0
    for i, a in views:
        others = [(j, b) for j, b in views if (j, b) != (i, a)]
        logit = {(j, b): float(z[i, a] @ z[j, b]) / temperature for j, b in others}
        log_denom = math.log(sum(math.exp(s) for s in logit.values()))
        weights = {}
        for j, b in others:
            if j == i:
                weights[(j, b)] = 1.0
            elif sets[i] & sets[j]:
                weights[(j, b)] = len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if overlap_weighting else 1.0
        if not weights:
            continue
        norm = sum(weights.values())
        total += -sum(w * (logit[p] - log_denom) for p, w in weights.items()) / norm
        count += 1
    return total / count if count else 0.0


MULTI = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.float32)


def test_hand_made_multi_label_positive_sets():
    # clips: {0,1} {0} {0,1} {2} {} {1,2}; positives share >= 1 label (the clip itself aside)
    expected = {0: {1: 1 / 2, 2: 1.0, 5: 1 / 3}, 1: {0: 1 / 2, 2: 1 / 2}, 2: {0: 1.0, 1: 1 / 2, 5: 1 / 3},
                3: {5: 1 / 2}, 4: {}, 5: {0: 1 / 3, 2: 1 / 3, 3: 1 / 2}}
    jaccard = label_affinity(MULTI, MULTI, overlap_weighting=True).fill_diagonal_(0)
    shared = label_affinity(MULTI, MULTI).fill_diagonal_(0)
    for i, pos in expected.items():
        assert set(shared[i].nonzero().flatten().tolist()) == set(pos)
        for j, w in pos.items():
            assert abs(float(jaccard[i, j]) - w) < 1e-6
    # one view: clip 4 has no positive and is left out; the rest by hand from the sets
    torch.manual_seed(2)
    z = F.normalize(torch.randn(6, 1, 5, dtype=torch.float64), dim=-1)
    for weighting in (False, True):
        per_anchor = []
        for i, pos in expected.items():
            if not pos:
                continue
            lp = torch.log_softmax(torch.cat([z[i, 0] @ z[j, 0][None].T / 0.5 for j in range(6) if j != i]), 0)
            col = {j: k for k, j in enumerate(j for j in range(6) if j != i)}
            w = {j: (wj if weighting else 1.0) for j, wj in pos.items()}
            per_anchor.append(-sum(w[j] * lp[col[j]] for j in w) / sum(w.values()))
        want = float(sum(per_anchor) / len(per_anchor))
        got = supcon_loss(z, z, MULTI, MULTI, 0, temperature=0.5, overlap_weighting=weighting)
        assert abs(float(got) - want) < 1e-5


@pytest.mark.parametrize("views", [2, 3])
def test_supcon_matches_slow_reference(views):
    torch.manual_seed(3)
    z = F.normalize(torch.randn(6, views, 4), dim=-1)
    ints = torch.tensor([0, 1, 0, -1, 2, 1])
    for labels, weighting in ((ints, False), (MULTI, False), (MULTI, True)):
        got = supcon_loss(z, z, labels, labels, 0, temperature=0.3, overlap_weighting=weighting)
        assert got.dtype == torch.float32
        assert abs(float(got) - slow_supcon(z, labels, 0.3, weighting)) < 1e-5


@pytest.mark.parametrize("views", [1, 2])
def test_supcon_rank_slices_average_to_the_global_loss(views):
    # with one view, rank 1 holds two unlabelled anchors (no positive) and rank 0 none
    torch.manual_seed(4)
    z = F.normalize(torch.randn(8, views, 4), dim=-1)
    cases = ((torch.tensor([0, 1, 0, 1, -1, 2, -1, 2]), False), (MULTI[[0, 1, 2, 3, 4, 5, 4, 5]], True))
    for labels, weighting in cases:
        per_rank = [supcon_loss(z[r * 4:(r + 1) * 4], z, labels[r * 4:(r + 1) * 4], labels, r,
                                temperature=0.2, overlap_weighting=weighting) for r in range(2)]
        assert abs(float(sum(per_rank) / 2) - slow_supcon(z, labels, 0.2, weighting)) < 1e-5


def test_supcon_without_any_positive_is_zero_and_backward_works():
    z = F.normalize(torch.randn(4, 1, 3), dim=-1).requires_grad_()
    labels = torch.tensor([-1, 0, 1, 2])
    loss = supcon_loss(z, z, labels, labels, 0, temperature=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    assert supcon_loss(z.bfloat16(), z.bfloat16(), labels, labels, 0, temperature=0.1).dtype == torch.float32


def test_classification_and_hybrid():
    torch.manual_seed(5)
    logits = torch.randn(5, 3)
    ints = torch.tensor([0, -1, 2, 1, -1])
    kept = ints >= 0
    assert torch.allclose(classification_loss(logits, ints), F.cross_entropy(logits[kept], ints[kept]))
    assert float(classification_loss(logits, torch.full((5,), -1))) == 0.0
    multi = MULTI[:5, :3]
    assert torch.allclose(classification_loss(logits, multi), F.binary_cross_entropy_with_logits(logits, multi))
    z = F.normalize(torch.randn(5, 2, 4), dim=-1)
    sup, ce = supcon_loss(z, z, ints, ints, 0, temperature=0.2), classification_loss(logits, ints)
    assert torch.equal(hybrid_loss(sup, ce, 1.0), sup) and torch.equal(hybrid_loss(sup, ce, 0.0), ce)
    assert torch.allclose(hybrid_loss(sup, ce, 0.5), (sup + ce) / 2)
    with pytest.raises(ValueError):
        hybrid_loss(sup, ce, 1.5)


def test_supcon_falls_under_sgd():
    torch.manual_seed(6)
    labels = torch.arange(4).repeat(4)
    x = torch.randn(4, 8)[labels] + 0.8 * torch.randn(16, 8)
    net = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        z = F.normalize(net(torch.stack([x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)], 1)), dim=-1)
        loss = supcon_loss(z, z, labels, labels, 0, temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert _falls(losses)


# ---------------------------------------------------------------- MoCo and NPID (one process)

def test_distributed_logsumexp_without_a_group_is_logsumexp():
    x = torch.randn(3, 5)
    assert torch.equal(distributed.distributed_logsumexp(x), torch.logsumexp(x, 1))


def slow_moco(q, k, queue, temperature) -> float:
    q, k, queue = q.double(), k.double(), queue.double()
    total = 0.0
    for i in range(q.shape[0]):
        logits = [float(q[i] @ k[i]) / temperature] + [float(q[i] @ row) / temperature for row in queue]
        total += math.log(sum(math.exp(s) for s in logits)) - logits[0]
    return total / q.shape[0]


def test_moco_matches_slow_reference():
    torch.manual_seed(7)
    q, k = F.normalize(torch.randn(4, 5), dim=1), F.normalize(torch.randn(4, 5), dim=1)
    queue = ShardedQueue(12, 5, 0, 1, seed=3)
    got = moco_logits_loss(q, k, queue.shard, 0, temperature=0.2)
    assert got.dtype == torch.float32
    assert abs(float(got) - slow_moco(q, k, queue.shard, 0.2)) < 1e-5
    assert moco_logits_loss(q.bfloat16(), k, queue.shard, 0, temperature=0.2).dtype == torch.float32


def test_moco_falls_under_sgd():
    torch.manual_seed(8)
    x, net = torch.randn(16, 8), torch.nn.Linear(8, 8)
    queue = ShardedQueue(64, 8, 0, 1, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        q = F.normalize(net(x + 0.3 * torch.randn_like(x)), dim=1)
        with torch.no_grad():
            k = F.normalize(net(x + 0.3 * torch.randn_like(x)), dim=1)
        loss = moco_logits_loss(q, k, queue.shard, 0, temperature=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert _falls(losses)


def slow_npid_exact(z, idx, bank, temperature) -> float:
    z, bank = z.double(), bank.double()
    total = 0.0
    for i in range(z.shape[0]):
        logits = [float(z[i] @ row) / temperature for row in bank]
        total += math.log(sum(math.exp(s) for s in logits)) - logits[int(idx[i])]
    return total / z.shape[0]


def slow_npid_nce(z, idx, noise, bank, temperature) -> float:
    z, bank = z.double(), bank.double()
    n, m = bank.shape[0], noise.shape[1]
    p_of = lambda i, r: math.exp(float(z[i] @ bank[r]) / temperature)  # noqa: E731  (times Z)
    big_z = n * sum(p_of(i, int(r)) for i in range(z.shape[0]) for r in noise[i]) / noise.numel()
    h = lambda p: (p / big_z) / (p / big_z + m / n)  # noqa: E731
    total = 0.0
    for i in range(z.shape[0]):
        total -= math.log(h(p_of(i, int(idx[i]))))
        total -= sum(math.log(1 - h(p_of(i, int(r)))) for r in noise[i])
    return total / z.shape[0]


def test_npid_matches_slow_references():
    torch.manual_seed(9)
    bank = ShardedMemoryBank(11, 5, 0, 1, momentum=0.5, seed=4)
    z, idx = F.normalize(torch.randn(4, 5), dim=1), torch.tensor([3, 0, 10, 7])
    got = npid_exact_loss(z, z, idx, bank, 0, temperature=0.3)
    assert got.dtype == torch.float32
    assert abs(float(got) - slow_npid_exact(z, idx, bank.shard, 0.3)) < 1e-5
    got = npid_nce_loss(z, z, idx, bank, 0, temperature=0.3, num_noise=6,
                        generator=torch.Generator().manual_seed(5))
    noise = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(5))
    assert abs(float(got) - slow_npid_nce(z, idx, noise, bank.shard, 0.3)) < 1e-5
    assert bank.nce_z is not None


def test_npid_falls_under_sgd():
    torch.manual_seed(10)
    x, net = torch.randn(16, 8), torch.nn.Linear(8, 8)
    bank = ShardedMemoryBank(16, 8, 0, 1, momentum=0.5, seed=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    idx, losses = torch.arange(16), []
    for _ in range(30):
        z = F.normalize(net(x + 0.1 * torch.randn_like(x)), dim=1)
        loss = npid_exact_loss(z, z, idx, bank, 0, temperature=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bank.update(idx, z)
        losses.append(loss.item())
    assert _falls(losses)


def test_logits_stay_float32_inside_autocast():
    """The trainer calls losses inside its autocast region: bf16 matmuls there would change
    the loss by ~1e-2; the losses switch autocast off for their logits."""
    torch.manual_seed(11)
    z = F.normalize(torch.randn(6, 2, 8), dim=-1)
    k = F.normalize(torch.randn(6, 8), dim=1)
    labels, weight = torch.tensor([0, 1, 0, 1, 2, 2]), torch.eye(8) + 0.1 * torch.randn(8, 8)
    queue = ShardedQueue(16, 8, 0, 1, seed=1)
    bank = ShardedMemoryBank(10, 8, 0, 1, momentum=0.5, seed=1)
    idx = torch.arange(6)
    losses = {
        "cola": lambda: cola_loss(z[:, 0], z[:, 1], weight, 0),
        "supcon": lambda: supcon_loss(z, z, labels, labels, 0, temperature=0.1),
        "moco": lambda: moco_logits_loss(z[:, 0], k, queue.shard, 0, temperature=0.1),
        "npid": lambda: npid_exact_loss(z[:, 0], z[:, 0], idx, bank, 0, temperature=0.05),
    }
    for name, fn in losses.items():
        plain = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = fn()
        assert mixed.dtype == torch.float32 and abs(float(mixed) - float(plain)) < 1e-6, name


# ---------------------------------------------------------------- LooC

def test_looc_spaces_pair_the_views_they_say():
    """Head 0 is SimCLR's multi-positive NT-Xent over all three views; head 1 pairs view 0
    with view 2 only, so what view 1 looks like in head 1 changes nothing, and a head 1 in
    which views 0 and 2 agree exactly gives a lower loss than one in which they do not."""
    from trainer.objectives import ObjectiveContext, build_objective
    from trainer.objectives.ntxent import nt_xent
    from trainer.train.config import ModelConfig, ObjectiveConfig

    d = 8
    obj = build_objective(ObjectiveConfig(name="looc", temperature=0.2), ModelConfig(proj_dim=d),
                          ObjectiveContext(num_views=3))
    assert len(obj.make_head(16).heads) == 2
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(6, 3, 2, d, generator=g, dtype=torch.float64), dim=-1).reshape(6, 3, 2 * d)
    loss = obj.loss({"z": z}, None)
    head0, head1 = z[..., :d], z[..., d:]
    expected = (nt_xent(head0, head0, 0, temperature=0.2) + nt_xent(head1[:, [0, 2]], head1[:, [0, 2]], 0,
                                                                     temperature=0.2)) / 2
    assert torch.allclose(loss, expected)
    moved = z.clone()
    moved[:, 1, d:] = F.normalize(torch.randn(6, d, generator=g, dtype=torch.float64), dim=-1)
    assert torch.allclose(obj.loss({"z": moved}, None), loss)
    agreeing = z.clone()
    agreeing[:, 2, d:] = agreeing[:, 0, d:]
    assert obj.loss({"z": agreeing}, None) < loss


def test_rows_logsumexp_in_blocks_equals_the_whole_forward_and_backward(monkeypatch):
    """NPID's log-sum-exp over a bank never holds the [Q, N] logits whole: blocks of rows
    forward and backward give what one matrix gives (here blocks of 3 of 10 rows)."""
    from trainer.objectives import common

    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(10, 5, generator=g, dtype=torch.float64), dim=1)
    z = F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    weights = torch.randn(4, generator=g, dtype=torch.float64)
    want = torch.logsumexp(z @ rows.T / 0.07, dim=1)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), z)
    monkeypatch.setattr(common, "LSE_BLOCK_BYTES", 4 * 8 * 3)  # 3 rows of logits per block
    got = common.rows_logsumexp(z, rows, 0.07)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), z)
    assert torch.allclose(got, want, atol=1e-12, rtol=0) and torch.allclose(got_grad, want_grad, atol=1e-12, rtol=0)
    empty = common.rows_logsumexp(z, rows[:0], 0.07)  # a rank that owns no rows
    assert torch.isneginf(empty).all()
