"""``audioclr check-shards DIR``: decode every member of every shard and list the broken ones.

The DALI back end cannot skip a clip that does not decode (a DALI batch cannot drop a
sample); this finds such clips before a run, or after a run stopped on one.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from concurrent import futures
from pathlib import Path

import soundfile as sf
import webdataset as wds

from dataio.manifest import ManifestError, load_manifest


def check_shard(path: str) -> tuple[int, list[tuple[str, str]]]:
    """(members read, [(member key or shard, reason)]) of one shard."""
    problems: list[tuple[str, str]] = []

    def on_error(exc: Exception) -> bool:
        problems.append((Path(path).name, f"unreadable tar data: {exc!r}"[:200]))
        return True

    count = 0
    for sample in wds.tarfile_samples([{"url": path}], handler=on_error):
        count += 1
        try:
            json.loads(sample["json"])
            wave, _ = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
            if wave.size == 0:
                raise ValueError("no samples")
        except Exception as err:  # every way a member can be broken is a finding here
            problems.append((sample.get("__key__", "?"), f"{type(err).__name__}: {err}"[:200]))
    return count, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr check-shards", description=__doc__)
    p.add_argument("shards", help="shard folder (with manifest.json)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.shards)
    except ManifestError as err:
        print(f"audioclr check-shards: error: {err}", file=sys.stderr)
        return 2
    paths = [str(x) for x in manifest.shard_paths()]
    bad = 0
    with futures.ProcessPoolExecutor(args.workers or None) as pool:
        for shard, (count, problems) in zip(manifest.shards, pool.map(check_shard, paths)):
            if count != shard.count:
                problems.append((shard.url, f"{count} members read, the manifest says {shard.count}"))
            for key, reason in problems:
                print(f"{shard.url}\t{key}\t{reason}")
            bad += len(problems)
    print(f"{len(paths)} shard(s) checked: {bad} problem(s)", file=sys.stderr)
    return 1 if bad else 0
