"""The files a run reads and writes: nothing is unpickled beyond tensors and plain
values (``weights_only=True``), and whatever is written is fsynced and renamed into place."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from trainer.errors import CheckpointError, describe_error  # noqa: F401 -- their home before errors.py


def load_tensors(path: str | Path, mmap: bool = False) -> dict:
    """A ``torch.save`` file of tensors and plain values, refusing anything that would run
    code when unpickled; with ``mmap`` the tensors are mapped, not read, until used."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    except Exception as err:  # noqa: BLE001 -- the unpickler raises many kinds; all mean "refused"
        first = str(err).strip().splitlines()
        reason = "it holds Python objects other than tensors and plain values, which audioclr " \
                 "never unpickles" if "Weights only load failed" in str(err) else \
                 f"unreadable ({type(err).__name__}: {first[0][:200] if first else ''})"
        raise CheckpointError(f"{path}: refused: {reason}") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, write) -> None:
    """``write(file)`` into ``path`` through a sibling ``.tmp``, fsynced, then renamed; on
    failure the ``.tmp`` is removed (a full disk gets its space back) and ``path`` is as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_tensors(path: Path, obj) -> None:
    """``torch.save(obj)`` into ``path`` durably. torch's writer reports a failed write (a
    full disk, a file size limit) as "RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos"; the bytes are then written again from memory, so the OS's own error
    (No space left on device, and the file) is what the user reads."""
    def write(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError:
            f.seek(0)
            f.truncate()
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            f.write(buffer.getbuffer())
    try:
        durable_write(path, write)
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise
