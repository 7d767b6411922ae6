"""The MoCo queue and the NPID memory bank sharded over 2 gloo ranks == one process
holding all of it: loss, gradients, updates, and checkpoints across a world-size change.
Each rank draws, saves and restores only its own rows (``slice_state``); the whole is
assembled here, in the test, from what the ranks saved.

The one-process side runs in the test process itself (no process group: every helper of
trainer.parallel.distributed answers for a world of one); the 2-rank side runs in spawned workers.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_workers

GLOBAL_B, D_IN, D = 6, 6, 4
TOL = 1e-5


def _data(world: int, rank: int, steps: int = 3):
    """This rank's slice of a fixed global batch: inputs [6/W, 6], keys [steps, 6/W, 4]."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_B, D_IN, generator=g, dtype=torch.float64)
    keys = F.normalize(torch.randn(steps, GLOBAL_B, D, generator=g, dtype=torch.float64), dim=-1)
    part = slice(rank * GLOBAL_B // world, (rank + 1) * GLOBAL_B // world)
    return x[part], keys[:, part]


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D).double()


def _saved(part) -> dict:
    """What a checkpoint keeps of a queue or bank on one rank: the shared state and the
    rank's slice."""
    record = part.slice_state()  # the live rows (saved at once in a checkpoint): copied to keep
    return {"state": part.state_dict(), "slice": {**record, "rows": record["rows"].clone()}}


def _load(part, saved_by_ranks: list[dict]) -> None:
    """Restore ``part`` from what every rank of some run saved (any world size)."""
    part.load_state_dict(saved_by_ranks[0]["state"], [s["slice"] for s in saved_by_ranks])


def _whole(saved_by_ranks: list[dict]) -> torch.Tensor:
    """The whole queue or bank, from the slices of every rank (in the test only)."""
    from trainer.objectives.common import rows_from_slices

    last = max(s["slice"]["hi"] for s in saved_by_ranks)
    return rows_from_slices([s["slice"] for s in saved_by_ranks], 0, last, D, "test")


def _grads_and_mean_loss(loss, params) -> tuple[float, dict]:
    """What DDP would leave: gradients averaged over ranks, and the mean loss."""
    from tests.dist_utils import average_gradients
    from trainer.parallel import distributed

    average_gradients(params)
    mean = distributed.reduce_mean({"loss": loss.item()}, torch.device("cpu"))["loss"]
    return mean, [p.grad.clone() for p in params]


# ---------------------------------------------------------------- MoCo

def _moco(rank: int, world: int, starts: list) -> list[dict]:
    """For each starting queue state (None: the seeded initial queue): the loss, query and
    encoder gradients, then the full queue after three enqueues (K=16, W*B=6: wraps)."""
    from trainer.objectives.moco import ShardedQueue, moco_logits_loss

    out = []
    for start in starts:
        queue = ShardedQueue(16, D, rank, world, seed=3, dtype=torch.float64)
        if start is not None:
            _load(queue, start)
        after_load = _saved(queue)
        enc, (x, keys) = _encoder(), _data(world, rank)
        q = F.normalize(enc(x), dim=1)
        q.retain_grad()
        loss = moco_logits_loss(q, keys[0], queue.shard, rank, temperature=0.2)
        loss.backward()
        mean, grads = _grads_and_mean_loss(loss, list(enc.parameters()))
        for k in keys:
            queue.enqueue(k)
        out.append(dict(loss=mean, q_grad=q.grad.clone(), grads=grads, after_load=after_load,
                        after_enqueue=_saved(queue)))
    return out


def _same_queue(a: list[dict], b: list[dict]) -> bool:
    """Two runs' saved queues (a list over their ranks) hold the same ring and pointer."""
    return a[0]["state"]["ptr"] == b[0]["state"]["ptr"] and torch.allclose(_whole(a), _whole(b), atol=1e-12,
                                                                             rtol=0)


@pytest.mark.e2e
def test_moco_sharded_queue_equals_one_process_and_resumes_across_world_sizes():
    one = _moco(0, 1, [None])[0]
    one_resumed = _moco(0, 1, [[one["after_enqueue"]]])[0]
    two = run_workers(_moco, 2, [None, [one["after_enqueue"]]])
    assert max(g.abs().max() for g in one["grads"]) > 1e-3  # the comparison has teeth
    for rank, (fresh, resumed) in enumerate(two):
        for got, want in ((fresh, one), (resumed, one_resumed)):
            assert abs(got["loss"] - want["loss"]) < TOL
            for g2, g1 in zip(got["grads"], want["grads"]):
                assert torch.allclose(g2, g1, atol=TOL, rtol=0)
            # a rank's query gradient is that of the sum of the ranks' losses; DDP's 1/W
            # averaging turns it into the gradient of the global mean loss
            rows = slice(rank * 3, rank * 3 + 3)
            assert torch.allclose(got["q_grad"] / 2, want["q_grad"][rows], atol=TOL, rtol=0)
    for i, want in enumerate((one, one_resumed)):
        for key in ("after_load", "after_enqueue"):
            assert _same_queue([two[0][i][key], two[1][i][key]], [want[key]])
            assert two[0][i][key]["slice"]["rows"].shape == (8, D)  # each rank saved half the ring
    # the enqueues wrapped the ring and moved every slot the batch touched
    assert one["after_enqueue"]["state"]["ptr"] == 18 % 16
    assert not torch.allclose(_whole([one["after_enqueue"]]), _whole([one["after_load"]]))
    # saved at W=2, loaded at W=1: the same full queue, the same continuation
    saved_by_two = [two[0][0]["after_enqueue"], two[1][0]["after_enqueue"]]
    back = _moco(0, 1, [saved_by_two])[0]
    assert _same_queue([back["after_load"]], saved_by_two)
    assert abs(back["loss"] - one_resumed["loss"]) < TOL


def test_enqueue_matches_a_plain_ring_buffer():
    from trainer.objectives.moco import ShardedQueue, initial_queue

    queue, ring = ShardedQueue(8, 2, 0, 1, seed=5), initial_queue(8, 2, 5)
    halves = [ShardedQueue(8, 2, r, 2, seed=5).shard for r in range(2)]
    assert torch.equal(torch.cat(halves), ring)  # each rank draws only its block, the same rows
    assert torch.equal(queue.shard, ring)
    ptr = 0
    for n in (3, 3, 3, 11):  # the last batch is larger than the queue
        keys = torch.randn(n, 2)
        for row in keys:
            ring[ptr] = row
            ptr = (ptr + 1) % 8
        queue.enqueue(keys)
        assert queue.ptr == ptr and torch.equal(queue.shard, ring)


def test_momentum_update_and_cosine_schedule():
    from trainer.objectives.moco import cosine_momentum, momentum_update

    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    source(torch.randn(5, 3))  # moves the source's running statistics
    before = [p.detach().clone() for p in target.parameters()]
    momentum_update(target, source, 0.9)
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
    for t, s in zip(target.buffers(), source.buffers()):
        assert torch.equal(t, s)
    assert cosine_momentum(0, 100, 0.99) == 0.99 and cosine_momentum(100, 100, 0.99) == 1.0
    assert abs(cosine_momentum(50, 100, 0.99) - (1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)) < 1e-12


# ---------------------------------------------------------------- NPID

N_ROWS = 7  # not divisible by 2: rank 0 owns rows 0-3, rank 1 rows 4-6
INDICES = torch.tensor([5, 0, 3, 6, 2, 3])  # row 3 twice: the last update wins everywhere


def _npid(rank: int, world: int, starts: list) -> list[dict]:
    """For each starting bank state: exact loss + gradients, two NCE steps (the first sets
    Z) + gradients of the second, then the full bank after one update."""
    from trainer.objectives.npid import ShardedMemoryBank, npid_exact_loss, npid_nce_loss
    from trainer.parallel import distributed

    out = []
    b = GLOBAL_B // world
    idx = INDICES[rank * b:(rank + 1) * b]
    for start in starts:
        bank = ShardedMemoryBank(N_ROWS, D, rank, world, momentum=0.5, seed=4, dtype=torch.float64)
        if start is not None:
            _load(bank, start)
        after_load = _saved(bank)
        enc, (x, _) = _encoder(), _data(world, rank)
        z = F.normalize(enc(x), dim=1)
        z_all, idx_all = distributed.gather_with_grad(z), distributed.gather_no_grad(idx)
        exact = npid_exact_loss(z, z_all, idx_all, bank, rank, temperature=0.3)
        exact.backward()
        exact_loss, exact_grads = _grads_and_mean_loss(exact, list(enc.parameters()))
        enc.zero_grad()
        gen, nce = torch.Generator().manual_seed(11), []
        for _ in range(2):
            z = F.normalize(enc(x), dim=1)
            z_all = distributed.gather_with_grad(z)
            loss = npid_nce_loss(z, z_all, idx_all, bank, rank, temperature=0.3, num_noise=5, generator=gen)
            nce.append(distributed.reduce_mean({"l": loss.item()}, torch.device("cpu"))["l"])
        loss.backward()
        _, nce_grads = _grads_and_mean_loss(loss, list(enc.parameters()))
        bank.update(idx_all, z_all.detach())
        out.append(dict(exact=exact_loss, exact_grads=exact_grads, nce=nce, nce_grads=nce_grads,
                        after_load=after_load, after_update=_saved(bank)))
    return out


def _same_bank(a: list[dict], b: list[dict]) -> bool:
    """Two runs' saved banks (a list over their ranks) hold the same rows and Z."""
    za, zb = a[0]["state"]["nce_z"], b[0]["state"]["nce_z"]
    same_z = (za is None and zb is None) or abs(za - zb) < 1e-9
    return same_z and torch.allclose(_whole(a), _whole(b), atol=1e-12, rtol=0)


@pytest.mark.e2e
def test_npid_sharded_bank_equals_one_process_and_resumes_across_world_sizes():
    one = _npid(0, 1, [None])[0]
    one_resumed = _npid(0, 1, [[one["after_update"]]])[0]
    two = run_workers(_npid, 2, [None, [one["after_update"]]])
    assert max(g.abs().max() for g in one["exact_grads"]) > 1e-3
    for fresh, resumed in two:
        for got, want in ((fresh, one), (resumed, one_resumed)):
            assert abs(got["exact"] - want["exact"]) < TOL
            assert all(abs(a - c) < TOL for a, c in zip(got["nce"], want["nce"]))
            for key in ("exact_grads", "nce_grads"):
                for g2, g1 in zip(got[key], want[key]):
                    assert torch.allclose(g2, g1, atol=TOL, rtol=0), key
    for i, want in enumerate((one, one_resumed)):
        for key in ("after_load", "after_update"):
            assert _same_bank([two[0][i][key], two[1][i][key]], [want[key]])
            assert [two[r][i][key]["slice"]["rows"].shape[0] for r in range(2)] == [4, 3]  # each its own rows
    assert one["after_update"]["state"]["nce_z"] is not None
    assert not torch.allclose(_whole([one["after_update"]]), _whole([one["after_load"]]))
    # saved at W=2, loaded at W=1: the same bank and Z, the same continuation
    saved_by_two = [two[0][0]["after_update"], two[1][0]["after_update"]]
    back = _npid(0, 1, [saved_by_two])[0]
    assert _same_bank([back["after_load"]], saved_by_two)
    assert abs(back["exact"] - one_resumed["exact"]) < TOL and back["nce"] == one_resumed["nce"]


def test_bank_blocks_and_update_formula():
    from trainer.objectives.npid import ShardedMemoryBank, initial_bank

    full = initial_bank(5, 3, seed=2)
    banks = [ShardedMemoryBank(5, 3, r, 4, momentum=0.7, seed=2) for r in range(4)]
    assert [(b.lo, b.hi) for b in banks] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert torch.equal(torch.cat([b.shard for b in banks]), full)
    assert torch.allclose(full.norm(dim=1), torch.ones(5))
    z, idx = torch.randn(2, 3), torch.tensor([4, 1])
    for b in banks:
        b.update(idx, z)
    want = full.clone()
    for i, row in zip(idx, z):
        want[i] = F.normalize(0.7 * full[i] + 0.3 * row, dim=0)
    assert torch.allclose(torch.cat([b.shard for b in banks]), want)
