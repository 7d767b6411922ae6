"""Verified checkpoints and resume (the exported encoder: :mod:`trainer.models.export`).

A checkpoint is a folder ``run_dir/checkpoints/step_XXXXXXXX/`` holding ``engine/`` (what
the engine saves from every rank: the whole model as ``weights.safetensors``, and DDP's
``optimizer.pt`` or DeepSpeed's sharded files), ``state.pt`` (what every rank shares:
objective state, step, config), one ``rank_<rank>.pt`` per rank (its RNG states, data
position and its slices of state sharded over ranks: NPID's bank rows, MoCo's queue
slots, which no rank ever gathers whole) and ``meta.json`` (step, world size, the engine that wrote it and the sha256 of
every other file). It is
assembled under ``step_XXXXXXXX.tmp``, every file fsynced, ``meta.json`` last, then
renamed into place: a killed run or a full disk never leaves a half-written checkpoint
where ``resume=auto`` would find it. Resume takes the newest checkpoint whose files match
their sums; a damaged one is renamed ``step_XXXXXXXX.damaged`` (never deleted) and the
one before it is taken.

Nothing is unpickled: every ``.pt`` is read with ``weights_only=True`` (tensors and plain
values only), so a planted file cannot run code. The run directory must be on storage
every node sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from trainer.parallel import distributed
from trainer.safe_files import (
    CheckpointError,
    describe_error,
    durable_write,
    fsync_folder,
    load_tensors,
    save_tensors,
    sha256,
)

__all__ = ["CheckpointError", "Checkpointer", "load_tensors", "slice_reader"]

log = logging.getLogger(__name__)

STATE = "state.pt"
META = "meta.json"
ENGINE = "engine"  # the engine's own files: save(folder) / load(folder)
FORMAT = 2  # 1: the model and optimizer inside state.pt (before engines saved themselves)
_STEP_FOLDER = re.compile(r"step_\d{8}")


def rng_state() -> dict:
    """Every generator's state as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def verify(folder: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when every file of the checkpoint matches its sha256, else what is wrong. With
    ``share=(rank, ranks)`` only every ``ranks``-th file from ``rank`` on is summed (the
    ranks of a resume split the reading: none reads the whole sharded state)."""
    try:
        meta = json.loads((folder / META).read_text())
        sums = meta["sha256"]
    except FileNotFoundError:
        return f"no {META} (written last, so the checkpoint was never completed)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{META} unreadable ({type(err).__name__})"
    if STATE not in sums:
        return f"{META} lists no {STATE}"
    if not isinstance(sums, dict):
        return f"{META}: sha256 is not a mapping"
    rank, ranks = share
    for name, expected in sorted(sums.items())[rank::ranks]:
        try:
            if sha256(folder / name) != expected:
                return f"{name} does not match its sha256 (changed or truncated after it was written)"
        except OSError as err:
            return f"{name} unreadable ({err.strerror or type(err).__name__})"
    return None


class Checkpointer:
    """Writes, verifies, finds and reads the checkpoints of one run (every rank calls
    ``save`` and ``resume_point``)."""

    def __init__(self, run_dir: str | Path, keep_last: int, info: distributed.DistInfo,
                 device: torch.device | None = None, every: int = 0, last: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.info = info
        self.device = device or torch.device("cpu")
        self.every, self.last = every, last
        self._verified: Path | None = None  # the folder resume_point() verified, not summed again by load()

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after ``step`` (every ``every`` steps; the
        run's ``last`` step is saved by its end, not here)."""
        return bool(self.every) and step % self.every == 0 and step < self.last

    def complete(self) -> list[Path]:
        """Checkpoint folders that were renamed into place, oldest first (not verified)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _STEP_FOLDER.fullmatch(p.name) and p.is_dir())

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def resume_point(self) -> Path | None:
        """The newest checkpoint that verifies (every rank calls it). The ranks check them
        newest first, together (:meth:`verify`); rank 0 renames each damaged one
        ``*.damaged`` with a warning naming it."""
        found = distributed.broadcast_object([str(p) for p in self.complete()] if self.info.is_main else None)
        for folder in map(Path, reversed(found)):
            problem = self.verify(folder)
            if problem is None:
                self._verified = folder
                return folder
            if self.info.is_main:
                aside = _free_name(folder.with_name(folder.name + ".damaged"))
                folder.rename(aside)
                log.warning("checkpoint %s is damaged: %s; set aside as %s, trying the one before",
                            folder, problem, aside.name)
        return None

    def verify(self, folder: Path) -> str | None:
        """:func:`verify` with the files split over the ranks (each sums its share, so no
        rank reads every rank's slice of a sharded bank); the first problem found, in rank
        order, on every rank (every rank calls it)."""
        share = (self.info.rank, self.info.world_size) if distributed.is_initialized() else (0, 1)
        return next((p for p in distributed.gather_objects(verify(folder, share)) if p), None)

    def save(self, step: int, shared: dict, per_rank: dict, engine) -> Path:
        """Write the checkpoint of ``step`` (every rank calls it; ``engine.save`` writes its
        own files into ``engine/``); on any failure (a full disk, ...) every rank raises
        :class:`CheckpointError` and the checkpoints already there are untouched."""
        final = self.root / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        error = None
        try:
            if self.info.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                (tmp / ENGINE).mkdir(parents=True)
        except OSError as err:
            error = err
        distributed.barrier()
        mine: dict = {}
        if error is None and tmp.is_dir():
            error = _try(lambda: mine.update(self._write_mine(tmp, per_rank, engine)))
        elif error is None:
            error = FileNotFoundError(f"{tmp} was not created")
        failed, = distributed.any_rank([error is not None], self.device)
        summed = {name: digest for sums in distributed.gather_objects(mine) for name, digest in sums.items()}
        if not failed and self.info.is_main:
            error = _try(lambda: self._finish(tmp, final, step, shared, engine.saved_as(), summed))
        failed, = distributed.any_rank([error is not None], self.device)
        if failed:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            raise CheckpointError(
                f"could not write checkpoint {final}: {describe_error(error) if error else 'another rank failed'}; "
                f"the last good checkpoint ({last.name if last else 'none yet'}) is unchanged")
        if self.info.is_main:
            for old in self.complete()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()
        return final

    def _write_mine(self, tmp: Path, per_rank: dict, engine) -> dict[str, str]:
        """This rank's part: the engine's files (a collective) and the rank file (its RNGs,
        data position and slices of sharded state), fsynced; returns the rank file's sha256
        (each rank sums its own: no rank reads all of a sharded bank)."""
        before = set(_files(tmp / ENGINE))
        engine.save(tmp / ENGINE)
        for path in set(_files(tmp / ENGINE)) - before:  # what this rank wrote, durably
            with contextlib.suppress(FileNotFoundError), open(path, "rb+") as f:
                os.fsync(f.fileno())
        name = f"rank_{self.info.rank:05d}.pt"
        save_tensors(tmp / name, per_rank)
        return {name: sha256(tmp / name)}

    def _finish(self, tmp: Path, final: Path, step: int, shared: dict, engine: dict, summed: dict) -> None:
        save_tensors(tmp / STATE, shared)
        sums = {p.relative_to(tmp).as_posix(): summed.get(p.relative_to(tmp).as_posix()) or sha256(p)
                for p in _files(tmp)}
        meta = {"format": FORMAT, "step": step, "world_size": self.info.world_size, **engine, "sha256": sums}
        durable_write(tmp / META, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        for folder in sorted({p.parent for p in _files(tmp)}, key=lambda p: -len(p.parts)):
            fsync_folder(folder)
        fsync_folder(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_folder(self.root)

    def load(self, folder: str | Path) -> tuple[dict, dict | None, dict]:
        """(shared state, this rank's state or None when the run had fewer ranks, the
        meta.json record: world size, engine); the engine's files are in ``folder/engine``.
        Every rank calls it (a folder not found by :meth:`resume_point` is verified here)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a checkpoint folder" +
                                  (" (it is a file)" if folder.exists() else " (it does not exist)"))
        problem = None if folder == self._verified else self.verify(folder)
        if problem is not None:
            raise CheckpointError(f"checkpoint {folder} is damaged: {problem}")
        meta = json.loads((folder / META).read_text())
        if meta.get("format", 1) != FORMAT:
            raise CheckpointError(f"checkpoint {folder} has format {meta.get('format', 1)} (written by an older "
                                  f"audioclr, the model inside state.pt); this version reads format {FORMAT}. "
                                  f"Finish that run with the version that started it, or start a new run")
        shared = load_tensors(folder / STATE)
        mine = folder / f"rank_{self.info.rank:05d}.pt"
        per_rank = load_tensors(mine, mmap=True) if mine.is_file() else None
        return shared, per_rank, meta


def slice_reader(folder: Path):
    """``name`` -> the slice records (see ``Objective.slice_state``) that every rank of
    checkpoint ``folder`` saved under ``name``, one rank file at a time, memory-mapped: a
    rank reads the rows it takes, not the whole bank."""
    files = sorted(Path(folder).glob("rank_*.pt"))

    def records(name: str):
        for path in files:
            record = load_tensors(path, mmap=True).get("slices", {}).get(name)
            if record is not None:
                yield record
    return records


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted (no ``.tmp`` leftovers of an interrupted write)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def _try(action) -> BaseException | None:
    try:
        action()
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        return err
    return None


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
