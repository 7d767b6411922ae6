"""Patch embeddings kept in the eval folder (``RUN_DIR/eval/<DATA SET>/embeddings.npz``),
so a rerun, a second frozen protocol and a sweep's embedding task read them instead of
embedding the corpus again.

The file is keyed by what its numbers depend on: the encoder's weights (a checksum of its
``encoder.safetensors``), the corpus (a checksum of its manifest and of the clips that were
read), the patch settings and the front end. A file of another key is stale: it is
recomputed and replaced, with a warning saying what differs; a file that does not read is
treated the same way. Writing is best effort (a read-only run folder is a warning).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainer.evaluate.clips import ClipSet
from trainer.evaluate.embed import ClipEmbeddings
from trainer.models.export import ENCODER_WEIGHTS
from trainer.safe_files import sha256

log = logging.getLogger("audioclr.eval")
CACHE_FILE = "embeddings.npz"


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(run_dir: str | Path, clips: ClipSet, frontend, *, patch: int, hop: int) -> dict:
    """What the embeddings of ``clips`` by the encoder of ``run_dir`` depend on; ``patch``
    and ``hop`` in samples."""
    m = clips.manifest
    corpus = {"manifest": None if m is None else {
        "dataset": m.dataset, "sample_rate": m.sample_rate, "clip_format": m.clip_format,
        "shards": [dataclasses.asdict(s) for s in m.shards]}, "keys": clips.keys}
    return {"encoder_sha256": sha256(Path(run_dir) / ENCODER_WEIGHTS), "corpus_sha256": _sha256_json(corpus),
            "num_clips": len(clips), "patch": patch, "hop": hop, "sample_rate": clips.sample_rate,
            "frontend_sha256": _sha256_json(dataclasses.asdict(frontend))}


def _read(path: Path) -> tuple[dict, ClipEmbeddings | None]:
    """(stored key, embeddings) of ``path``; ({}, None) when it does not read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["key"])), ClipEmbeddings(z["patches"], z["owner"])
    except Exception as err:  # noqa: BLE001 - a damaged cache is recomputed, never fatal
        log.warning("could not read %s (%r): embedding again", path, err)
        return {}, None


def _write(path: Path, key: dict, emb: ClipEmbeddings) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, patches=emb.patches, owner=emb.owner, key=np.asarray(json.dumps(key, sort_keys=True)))
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
        log.info("embeddings kept in %s for the next evaluation of this encoder and data set", path)
    except BaseException as err:  # a stop too: no .tmp left behind
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        log.warning("could not keep the embeddings in %s: %s", path, err)


def cached_embeddings(folder: str | Path, key: dict, compute: Callable[[], ClipEmbeddings],
                      keep: bool = True) -> tuple[ClipEmbeddings, bool]:
    """(embeddings, whether they were read from ``folder``): those stored there under
    ``key``, or ``compute()``'s, then stored (with ``keep``: one rank of several writes)."""
    path = Path(folder) / CACHE_FILE
    if path.is_file():
        stored, emb = _read(path)
        if emb is not None and stored == key:
            log.info("embeddings of %d clips read from %s", key["num_clips"], path)
            return emb, True
        if emb is not None:
            differ = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
            log.warning("%s is stale (%s differ): embedding again", path, ", ".join(differ))
    emb = compute()
    if keep:
        _write(path, key, emb)
    return emb, False
