"""Write audio clips into WebDataset shards, DALI index files and a manifest.

Per clip, a worker process loads the audio (``loader``), mixes it down to mono, resamples
it to the target rate, validates it, quantises it to 16 bits and encodes it in the clip
format (:mod:`dataio.formats`: FLAC, raw 16-bit PCM, or a float16 log-mel). Accepted
clips go, in a seeded shuffled order, into ``shard-NNNNN.tar`` (members ``KEY.flac`` /
``KEY.pcm`` / ``KEY.mel`` and ``KEY.json``) with one DALI index ``shard-NNNNN.idx`` per
tar (:mod:`dataio.writing.tar_writer`), then come ``rejected.tsv`` (``path<TAB>reason`` of every
clip left out) and ``manifest.json``. Listing, encoding and tar writing all run in the
workers (:mod:`dataio.writing.shard_pipeline`); the same items and seed give byte-identical
shards whatever the number of workers. This module holds what one clip goes through."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from dataio.errors import ShardWriteError
from dataio.formats import FORMATS, ClipFormat, clip_format
from dataio.formats.logmel import frontend_record
from dataio.reading.manifest import MANIFEST_NAME
from dataio.reading.remote import is_url, shown
from dataio.writing.sources.item import ClipItem, safe_key

REJECTED_NAME = "rejected.tsv"
DEFAULT_SHARD_SIZE = 1000
if TYPE_CHECKING:  # the workers compute log-mels; this module stays free of torch
    from dataio.frontend import FrontendConfig

log = logging.getLogger(__name__)

WORK_DIR_NAME = "shard-work.tmp"  # the writer's working files (dataio.writing.shard_store)
_OUR_FILES = re.compile(r"^(shard-\d{5,}\.(tar|idx)|manifest\.json|rejected\.tsv)(\.tmp)?$")


@dataclass
class WriteReport:
    """What :func:`write_shards` did: ``rejected`` holds (path, reason), ``seconds`` wall time."""

    num_accepted: int
    rejected: list[tuple[str, str]]
    num_shards: int
    out_dir: Path
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.num_accepted} clips into {self.num_shards} shard(s) in "
                f"{self.out_dir} in {self.seconds:.1f} s; {len(self.rejected)} rejected")


Loader = Callable[[ClipItem], "tuple[np.ndarray, int]"]


def soundfile_loader(item: ClipItem) -> tuple[np.ndarray, int]:
    """Read ``item.path``: float32 samples ``[frames, channels]`` and the rate in Hz.

    Custom loaders follow the same contract and may also return ``[frames]`` (mono).
    """
    if not Path(item.path).is_file():
        raise FileNotFoundError(item.path)
    with open(item.path, "rb") as f:  # Python opens any name the file system holds, UTF-8 or not
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file (0 bytes)")
        try:
            samples, rate = sf.read(f, dtype="float32", always_2d=True)
        except sf.LibsndfileError as err:
            raise ValueError(f"libsndfile: {err.error_string}") from None
    return samples, int(rate)


def base_key(item: ClipItem) -> str:
    """The safe key ``item`` asks for (its ``key``, else its path's last two parts)."""
    return safe_key(item.key or "_".join(Path(item.path).parts[-2:]))


def assign_keys(items: Sequence[ClipItem]) -> list[str]:
    """A safe, unique key per item, in item order (``_1``, ``_2``, ... added on collisions)."""
    return unique_keys([base_key(item) for item in items])


def unique_keys(bases: Iterable[str]) -> list[str]:
    """``bases`` made unique in order: a key already taken gets ``_1``, ``_2``, ..."""
    taken: set[str] = set()
    keys = []
    for base in bases:
        key, n = base, 0
        while key in taken:
            n += 1
            key = f"{base}_{n}"
        taken.add(key)
        keys.append(key)
    return keys


@dataclass
class ClipResult:
    """A worker's answer: the member's bytes and the clip's length in samples (at the
    target rate), or a reason."""

    data: bytes | None = None
    frames: int = 0
    reason: str | None = None


@dataclass(frozen=True)
class Encoding:
    """How clips are written: ``clip_format`` (flac, pcm16, logmel: :mod:`dataio.formats`)
    and, for a mel format, the front end its features are computed with (the encoding itself is the workers':
    :func:`dataio.writing.clip_encoding.encode_clip`)."""

    clip_format: str = "flac"
    frontend: FrontendConfig | None = None

    @property
    def ext(self) -> str:
        return self.format.ext

    @property
    def format(self) -> ClipFormat:
        try:
            return clip_format(self.clip_format)
        except ValueError as err:
            raise ShardWriteError(str(err)) from None

    @classmethod
    def named(cls, clip_format: str, frontend: FrontendConfig | None = None) -> Encoding:
        """Writing ``clip_format``, with ``frontend`` where the format stores features."""
        encoding = cls(clip_format)
        return cls(clip_format, frontend) if encoding.format.stores_frontend else encoding

    def manifest_fields(self) -> dict:
        return {"clip_format": self.clip_format,
                "frontend": frontend_record(self.frontend) if self.format.stores_frontend else {}}


def _one_line(text: object, limit: int = 200) -> str:
    """``text`` on one line, with the bytes of a file name that is not UTF-8 written as
    ``\\xNN`` (such names reach Python as lone surrogates, which no UTF-8 file can hold)."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return " ".join(text.split())[:limit]


def check_encoding(encoding: Encoding, sample_rate: int) -> None:
    """A known clip format; a mel format's front end at the shards' rate."""
    if encoding.clip_format not in FORMATS:
        raise ShardWriteError(f"unknown clip format {encoding.clip_format!r}: choose one of {', '.join(FORMATS)}")
    if encoding.format.stores_frontend:
        if encoding.frontend is None:
            raise ShardWriteError(f"a {encoding.clip_format} corpus needs the front end to compute its log-mels with")
        if encoding.frontend.sample_rate != sample_rate:
            raise ShardWriteError(f"the front end's sample_rate {encoding.frontend.sample_rate} Hz differs from "
                                  f"the shards' {sample_rate} Hz")


def refuse_output_over_input(src: str | Path, out: str | Path) -> None:
    """ShardWriteError when ``out`` is ``src`` or lies inside it, however either is spelled
    (``X/../X``, a symlink, a trailing slash; URLs compared without credentials or query):
    a command never writes over, or deletes with ``--overwrite``, the corpus it reads."""
    if is_url(src) != is_url(out):
        return
    if is_url(src):
        a, b = (urllib.parse.urlsplit(str(u)) for u in (src, out))
        a_path, b_path = a.path.rstrip("/") + "/", b.path.rstrip("/") + "/"
        same_store = (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)
        inside = same_store and b_path.startswith(a_path)
    else:
        a_dir, b_dir = Path(os.path.realpath(src)), Path(os.path.realpath(out))
        inside = b_dir == a_dir or a_dir in b_dir.parents
    if inside:
        raise ShardWriteError(f"--out {shown(str(out))} is the input {shown(str(src))} or inside it: writing there "
                              f"would replace the clips being read; choose a folder outside it")


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite`` (then drop our old
    files). A folder holding nothing but the files of a write that never finished (our
    shards and working files, no manifest: a stopped or failed run) is taken over as if
    it were empty, so rerunning the stopped command is what resumes it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardWriteError(f"output {out_dir} exists and is not a folder")
    entries = list(out_dir.iterdir()) if out_dir.is_dir() else []
    unfinished = entries and all(_ours(e) for e in entries) and not (out_dir / MANIFEST_NAME).exists()
    if entries and not overwrite and not unfinished:
        raise ShardWriteError(f"output folder {out_dir} is not empty: choose another folder "
                              f"or pass --overwrite to replace its shards")
    if unfinished:
        log.info("%s holds the shards of a write that never finished (no manifest): replacing them", out_dir)
    remove_our_files(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _ours(entry: Path) -> bool:
    return (entry.is_file() and bool(_OUR_FILES.match(entry.name))) or (entry.is_dir() and entry.name == WORK_DIR_NAME)


def remove_our_files(out_dir: Path, unfinished_only: bool = False) -> None:
    """Delete what a shard writer leaves in ``out_dir`` (with ``unfinished_only``: only its
    ``.tmp`` files and working folder, what a stopped or failed write leaves behind)."""
    for entry in list(out_dir.iterdir()) if out_dir.is_dir() else []:
        if not _ours(entry) or (unfinished_only and not entry.name.endswith(".tmp")):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def check_loader(loader: Loader, workers: int) -> None:
    """Fail before any work when worker processes cannot be sent ``loader``."""
    if workers != 1:
        try:
            pickle.dumps(loader)
        except Exception as err:  # noqa: BLE001
            raise ShardWriteError(f"loader {loader!r} cannot be sent to worker processes (make "
                                  f"it a top-level function, or use workers=1): {err}") from err


def check_vocabulary(labels: set[str], vocabulary: list[str] | None) -> None:
    """Fail before encoding when a listed label is outside the given vocabulary."""
    unknown = sorted(labels - set(vocabulary or []))
    if vocabulary is not None and unknown:
        raise ShardWriteError(f"{len(unknown)} label(s) missing from the given vocabulary, "
                              f"e.g. {unknown[:5]}")


def clip_json_rest(dataset: str, item: ClipItem, duration: float) -> bytes:
    """The ``KEY.json`` member but its ``index`` (which :func:`dataio.writing.shard_plan.json_with_index`
    puts first once the clip's place is known); ``duration`` in seconds; ``subset`` only
    when the item has one."""
    meta = {"dataset": dataset, "labels": [str(x) for x in item.labels],
            "split": item.split, "fold": None if item.fold is None else int(item.fold),
            "duration": round(duration, 6)}
    if item.subset is not None:
        meta["subset"] = str(item.subset)
    return json.dumps(meta).encode()
