"""State sharded over ranks is born, saved and restored sharded (issue 35, item 1): each
rank draws only its rows of NPID's bank and MoCo's queue, writes only its rows into its own
rank file of the checkpoint, and a resume at another world size takes each rank's rows
from the saved slices; nothing holds the whole. A slice that is missing or of the wrong
size is refused by name."""

import pytest
import torch

from tests.dist_utils import run_workers

N, K, D = 11, 8, 4  # bank rows (not divisible by 2), queue slots, row width


class _NoEngine:
    """An engine with nothing of its own to save (the checkpoint's sliced state alone)."""

    def save(self, folder) -> None:
        pass

    def saved_as(self) -> dict:
        return {"engine": "none"}


def _parts(rank: int, world: int):
    from trainer.objectives.moco import ShardedQueue
    from trainer.objectives.npid import ShardedMemoryBank

    return ShardedMemoryBank(N, D, rank, world, momentum=0.5, seed=7), ShardedQueue(K, D, rank, world, seed=7)


def _save_then_load(rank: int, world: int, run_dir: str, load_from: str | None) -> dict:
    """Load the checkpoint in ``load_from`` (if any) into a fresh bank and queue, step them
    once, save a checkpoint into ``run_dir``; what this rank held at each point."""
    from trainer.parallel import distributed
    from trainer.train.checkpoint import Checkpointer, slice_reader

    info = distributed.env_info()
    bank, queue = _parts(rank, world)
    drawn = (bank.shard.clone(), queue.shard.clone(), queue.ptr)
    if load_from is not None:
        folder = Checkpointer(load_from, 2, info).resume_point()
        shared, _, _ = Checkpointer(load_from, 2, info).load(folder)
        bank.load_state_dict(shared["bank"], slice_reader(folder)("bank"))
        queue.load_state_dict(shared["queue"], slice_reader(folder)("queue"))
    loaded = (bank.shard.clone(), queue.shard.clone(), queue.ptr)
    g = torch.Generator().manual_seed(3)
    z, idx = torch.randn(6, D, generator=g), torch.tensor([0, 10, 5, 6, 3, 9])
    bank.update(idx, z)
    keys = torch.randn(6, D, generator=g)  # the global batch of keys; this rank's share enqueued (gathered)
    queue.enqueue(keys[rank * 6 // world:(rank + 1) * 6 // world])
    Checkpointer(run_dir, 2, info).save(1, {"bank": bank.state_dict(), "queue": queue.state_dict()},
                                        {"slices": {"bank": bank.slice_state(), "queue": queue.slice_state()}},
                                        _NoEngine())
    return {"drawn": drawn, "loaded": loaded, "saved": (bank.shard.clone(), queue.shard.clone(), queue.ptr)}


def _whole(per_rank: list[dict], key: str) -> tuple:
    return (torch.cat([r[key][0] for r in per_rank]), torch.cat([r[key][1] for r in per_rank]), per_rank[0][key][2])


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.e2e
def test_two_ranks_save_their_own_rows_and_resume_at_one_and_back(tmp_path):
    from trainer.objectives.moco import initial_queue
    from trainer.objectives.npid import initial_bank

    one = run_workers(_save_then_load, 1, str(tmp_path / "one"), None)
    two = run_workers(_save_then_load, 2, str(tmp_path / "two"), None)
    # born sharded: each rank drew only its rows, and together they are the one-process whole
    assert [r["drawn"][0].shape[0] for r in two] == [6, 5] and [r["drawn"][1].shape[0] for r in two] == [4, 4]
    assert torch.equal(_whole(two, "drawn")[0], initial_bank(N, D, 7))
    assert torch.equal(_whole(two, "drawn")[1], initial_queue(K, D, 7))
    assert _same(_whole(two, "saved"), _whole(one, "saved"))
    # each rank's file holds its own rows; the shared state none
    folder = tmp_path / "two" / "checkpoints" / "step_00000001"
    saved = {r: torch.load(folder / f"rank_{r:05d}.pt", weights_only=True)["slices"] for r in (0, 1)}
    assert [saved[r]["bank"]["rows"].shape[0] for r in (0, 1)] == [6, 5]
    assert all(not isinstance(v, torch.Tensor) for part in torch.load(folder / "state.pt", weights_only=True).values()
               for v in part.values())
    # saved by 2 ranks, resumed by 1, and saved by 1, resumed by 2: the same rows and pointer
    two_to_one = run_workers(_save_then_load, 1, str(tmp_path / "a"), str(tmp_path / "two"))
    one_to_two = run_workers(_save_then_load, 2, str(tmp_path / "b"), str(tmp_path / "one"))
    assert _same(_whole(two_to_one, "loaded"), _whole(two, "saved"))
    assert _same(_whole(one_to_two, "loaded"), _whole(one, "saved"))
    assert _same(_whole(two_to_one, "saved"), _whole(one_to_two, "saved"))


def test_a_missing_or_misshapen_slice_is_refused_by_name():
    from trainer.objectives.common import slice_record

    bank, queue = _parts(0, 2)  # rows 0-5 of 11, slots 0-3 of 8
    with pytest.raises(ValueError, match=r"memory bank slices do not cover rows 0\.\.5 \(row 3 is in none"):
        bank.load_state_dict({"num_rows": N}, [slice_record(0, 3, torch.zeros(3, D))])
    with pytest.raises(ValueError, match=r"memory bank slice of rows 0\.\.5 holds \(5, 4\), not \(6, 4\)"):
        bank.load_state_dict({"num_rows": N}, [slice_record(0, 6, torch.zeros(5, D))])
    with pytest.raises(ValueError, match="saved memory bank has 12 rows, expected 11"):
        bank.load_state_dict({"num_rows": 12}, [])
    with pytest.raises(ValueError, match=r"MoCo queue slices do not cover rows 0\.\.3"):
        queue.load_state_dict({"size": K, "ptr": 0}, [])
    whole = torch.nn.functional.normalize(torch.randn(N, D), dim=1)  # a checkpoint of an older version
    bank.load_state_dict({"bank": whole, "nce_z": 2.0})
    assert torch.equal(bank.shard, whole[:6]) and bank.nce_z == 2.0


def _resume_reading(rank: int, world: int, run_dir: str) -> dict:
    """resume_point() then load() on this rank: the checkpoint chosen and the files it summed."""
    from pathlib import Path

    import trainer.train.checkpoint as checkpoint
    from trainer.parallel import distributed

    summed, real = [], checkpoint.sha256
    checkpoint.sha256 = lambda path: (summed.append(Path(path).name), real(path))[1]
    ckpt = checkpoint.Checkpointer(run_dir, 2, distributed.env_info())
    folder = ckpt.resume_point()
    if folder is not None:
        ckpt.load(folder)
    return {"folder": None if folder is None else folder.name, "summed": summed}


@pytest.mark.e2e
def test_the_ranks_of_a_resume_verify_the_checkpoint_together_each_reading_a_share(tmp_path):
    """No rank reads every rank's slice at a resume (rank 0 summed all of them, and every
    rank summed them all again at load): the files are split over the ranks, each summed
    once, and damage in a file only another rank reads still sets the checkpoint aside."""
    run_workers(_save_then_load, 2, str(tmp_path / "run"), None)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    files = sorted(p.name for p in folder.glob("*.pt"))
    assert files == ["rank_00000.pt", "rank_00001.pt", "state.pt"]
    got = run_workers(_resume_reading, 2, str(tmp_path / "run"))
    assert [r["folder"] for r in got] == ["step_00000001"] * 2
    assert sorted(got[0]["summed"] + got[1]["summed"]) == files and not set(got[0]["summed"]) & set(got[1]["summed"])
    damaged = folder / got[1]["summed"][0]  # a file rank 0 does not read
    damaged.write_bytes(damaged.read_bytes()[:-1] + bytes([damaged.read_bytes()[-1] ^ 1]))
    got = run_workers(_resume_reading, 2, str(tmp_path / "run"))
    assert [r["folder"] for r in got] == [None, None]
    assert not folder.exists() and folder.with_name("step_00000001.damaged").is_dir()
