"""What a dataset layout hands the shard writer: one clip to write (:class:`ClipItem`),
and the tar-safe form of a key (:func:`safe_key`)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

MAX_KEY_CHARS = 80  # "KEY.flac" stays inside the 100-character ustar name field
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class ClipItem:
    """One clip to write: where its audio comes from and what its shard JSON says.

    ``path`` is a file for :func:`soundfile_loader` or any id a custom loader understands;
    ``key`` is the tar key (default: the path's last two parts, made safe and unique by
    :func:`write_shards`); ``extra`` holds free parameters for custom loaders;
    ``subset`` names a part of the dataset finer than the split (FSDnoisy18k's ``clean``
    or ``noisy``, AudioSet's ``balanced_train``) and is written to the JSON only when set.
    """

    path: str
    labels: list[str]
    split: str = "train"
    fold: int | None = None
    key: str | None = None
    extra: dict = field(default_factory=dict)
    subset: str | None = None


def safe_key(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``.

    Keys longer than MAX_KEY_CHARS keep their tail plus a short hash of the whole.
    """
    key = _UNSAFE_KEY_CHARS.sub("_", text).strip("_") or "clip"
    if len(key) > MAX_KEY_CHARS:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = key[-(MAX_KEY_CHARS - 9):].lstrip("_-") + "-" + digest
    return key
