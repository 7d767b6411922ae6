"""A node-local copy of a remote corpus, for the DALI back end.

DALI's readers open local files, and every rank's reader lists every shard (DALI splits
the samples itself), so a node needs the whole corpus on its disk. ``localize`` fetches it
once per node into ``data.cache_dir`` (each corpus in a folder named by its URL's hash):
the ranks of a node take an exclusive lock on the cache in turn, the first fetches (8
shards at a time, each under a temporary name then renamed), the others find it complete.
The copy is stamped with its manifest's digest: a corpus replaced at its URL is fetched again.
The cache holds at most ``data.cache_gb``: corpora not used for longest are evicted to make
room; a corpus larger than the limit is refused with the numbers. The torch back end
streams and needs none of this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dataio.errors import CacheError
from dataio.reading.manifest import MANIFEST_NAME, Manifest
from dataio.reading.remote import Retry, join, open_stream, shown

log = logging.getLogger(__name__)

DONE = ".complete"  # written last: the folder holds every file of the manifest
USED = ".used"  # touched by every run that uses the folder: eviction goes by its time


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUDIOCLR_CACHE") or Path.home() / ".cache" / "audioclr" / "shards")


def localize(manifest: Manifest, cache_dir: str | Path, limit_gb: float, retry: Retry = Retry()) -> Manifest:
    """``manifest`` with its root in the node-local cache, fetched there if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / hashlib.sha256(str(manifest.root).encode()).hexdigest()[:20]
    files = [(s.url, s.bytes) for s in manifest.shards] + [(s.index_file, 0) for s in manifest.shards if s.index_file]
    need = sum(size for _, size in files)
    limit = int(limit_gb * (1 << 30))
    if need > limit:
        raise CacheError(f"data.cache_gb: the corpus at {manifest.where} needs {need / (1 << 30):.2f} GB of node-local "
                         f"cache for the DALI back end, the limit is {limit_gb:g} GB; raise it, or use "
                         f"data.backend=torch, which streams")
    digest = manifest_digest(manifest)
    with _locked(cache / ".lock"):
        if (folder / DONE).is_file() and _cached_digest(folder) != digest:
            log.warning("shard cache: the corpus at %s changed since it was cached in %s (its manifest differs); "
                        "fetching it again", manifest.where, folder)
            shutil.rmtree(folder)
        if not (folder / DONE).is_file():
            _evict(cache, folder, limit - need)
            _fetch(manifest, folder, files, retry)
        (folder / USED).touch()
    return dataclasses.replace(manifest, root=folder)


def manifest_digest(manifest: Manifest) -> str:
    """What identifies a corpus's content: the sha256 of its manifest (shards, sizes,
    counts, format), wherever it is."""
    return hashlib.sha256(json.dumps(manifest.to_json(), sort_keys=True).encode()).hexdigest()


def _cached_digest(folder: Path) -> str | None:
    try:
        return json.loads((folder / DONE).read_text()).get("manifest_sha256")
    except (OSError, ValueError, AttributeError):
        return None  # an older or damaged stamp: fetched again


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock shared by every process on this node (and on NFS where it locks)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _evict(cache: Path, keep: Path, room: int) -> None:
    """Remove the corpora used longest ago until the others fit in ``room`` bytes."""
    others = [p for p in cache.iterdir() if p.is_dir() and p != keep]
    others.sort(key=lambda p: (p / USED).stat().st_mtime if (p / USED).exists() else 0.0)
    held = sum(_size(p) for p in others) + (_size(keep) if keep.is_dir() else 0)
    while others and held > room:
        victim = others.pop(0)
        held -= _size(victim)
        log.info("shard cache: evicting %s (least recently used)", victim.name)
        shutil.rmtree(victim, ignore_errors=True)


def _fetch(manifest: Manifest, folder: Path, files: list[tuple[str, int]], retry: Retry) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    start, fetched = time.perf_counter(), 0

    def one(item: tuple[str, int]) -> int:
        name, size = item
        target = folder / name
        if target.is_file() and (not size or target.stat().st_size == size):
            return 0  # an earlier, interrupted fill got this far
        tmp = target.with_name(target.name + ".part")
        with open_stream(join(str(manifest.root), name), retry) as stream, open(tmp, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        tmp.replace(target)
        return target.stat().st_size

    log.info("shard cache: fetching %d file(s) of %s into %s", len(files), manifest.where, folder)
    with ThreadPoolExecutor(8) as pool:
        for got in pool.map(one, files):
            fetched += got
    text = json.dumps({"url": shown(str(manifest.root)), "files": len(files),
                       "manifest_sha256": manifest_digest(manifest)})
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_json()))
    (folder / DONE).write_text(text)
    seconds = time.perf_counter() - start
    log.info("shard cache: %.1f MB in %.1f s (%.1f MB/s)", fetched / 1e6, seconds, fetched / 1e6 / max(seconds, 1e-9))
