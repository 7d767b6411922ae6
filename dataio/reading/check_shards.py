"""``audioclr check-shards DIR``: read every member of every shard, in the corpus's clip
format, and list the broken ones.

The DALI back end cannot skip a clip that does not decode (a DALI batch cannot drop a
sample); this finds such clips before a run, or after a run stopped on one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from dataio.errors import RemoteError
from dataio.formats.codec import ClipCodec
from dataio.reading.manifest import load_manifest
from dataio.reading.remote import Retry, is_url, join, read_bytes, tar_samples
from dataio.schema import cli_number
from dataio.workers import worker_pool


def member_problem(sample: dict, codec: ClipCodec, num_clips: int, vocabulary: set[str]) -> str | None:
    """What either back end would trip on in one sample, or None: a missing member, JSON
    that is not an object with an ``index`` below ``num_clips`` and a list of known
    ``labels``, or a clip member that does not read in the corpus's format (audio that does
    not decode, is empty or at another rate; a byte count that is not whole samples or
    frames; non-finite log-mel values)."""
    for ext in ("json", codec.ext):
        if ext not in sample:
            return f"no .{ext} member"
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        return f"labels JSON does not parse: {err}"
    if not isinstance(meta, dict):
        return f"labels JSON is a {type(meta).__name__}, not an object"
    index = meta.get("index")
    if not isinstance(index, int) or not 0 <= index < num_clips:
        return f"labels JSON: 'index' {index!r} is not an integer in [0, {num_clips})"
    labels = meta.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        return f"labels JSON: 'labels' {labels!r} is not a list of names"
    unknown = [x for x in labels if x not in vocabulary]
    if unknown:
        return f"labels JSON: {unknown[:3]} not in the manifest's vocabulary"
    return codec.problem(sample[codec.ext])


def check_shard(path: str, codec: ClipCodec, num_clips: int, vocabulary: tuple[str, ...],
                expected: int) -> list[tuple[str, str]]:
    """[(member key or shard file name, reason)] of one shard of ``expected`` members.

    A shard whose tar data stops reading (cut short, a damaged header) is one line saying
    how far the read got, not a second one for the members it therefore missed."""
    problems: list[tuple[str, str]] = []
    unreadable: list[Exception] = []
    known = set(vocabulary)

    def on_error(exc: Exception) -> bool:
        unreadable.append(exc)
        return True

    count = 0
    for sample in tar_samples(path, on_error):  # a path or a URL (streamed)
        count += 1
        problem = member_problem(sample, codec, num_clips, known)
        if problem:
            problems.append((sample.get("__key__", "?"), problem[:200]))
    name = path.rsplit("/", 1)[-1]
    if unreadable:
        error = f"{type(unreadable[0]).__name__}: {unreadable[0]}"
        problems.append((name, f"unreadable tar data after {count} of {expected} members: {error}"[:300]))
    elif count != expected:
        problems.append((name, f"{count} members read, the manifest says {expected}"))
    return problems


def index_problems(root: Path, shard) -> list[tuple[str, str]]:
    """What the DALI reader would trip on in a shard's index file (its second field is
    the number of samples it lists)."""
    if not shard.index_file:
        return []
    try:
        if is_url(root):
            text = read_bytes(join(root, shard.index_file), Retry(attempts=2)).decode()
        else:
            text = (Path(root) / shard.index_file).read_text()
        listed = int(text.split("\n", 1)[0].split()[1])
    except FileNotFoundError:
        return [(shard.index_file, "DALI index file missing (data.backend=dali cannot read this shard)")]
    except RemoteError as err:
        return [(shard.index_file, f"DALI index file unreadable: {err}"[:200])]
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as err:
        return [(shard.index_file, f"DALI index file unreadable: {err!r}"[:200])]
    if listed != shard.count:
        return [(shard.index_file, f"DALI index lists {listed} samples, the manifest says {shard.count}")]
    return []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="audioclr check-shards", description=__doc__)
    p.add_argument("shards", help="shard folder (with manifest.json), or its URL")
    p.add_argument("--workers", type=cli_number(int, 0), default=0, help="processes (0 = all cores)")
    return p.parse_args(argv)


def check_all(args: argparse.Namespace) -> int:
    """Check every shard ``args.shards`` lists: 0 when all is well, 1 with problems (a bad
    manifest raises ManifestError)."""
    manifest = load_manifest(args.shards)
    paths = [str(x) for x in manifest.shard_paths()]
    bad = 0
    with worker_pool(args.workers or None) as pool:
        checks = pool.map(check_shard, paths, itertools.repeat(ClipCodec.of(manifest)),
                          itertools.repeat(manifest.num_clips), itertools.repeat(tuple(manifest.vocabulary)),
                          [shard.count for shard in manifest.shards])
        for shard, problems in zip(manifest.shards, checks):
            problems += index_problems(manifest.root, shard)
            for key, reason in problems:
                print(f"{shard.url}\t{key}\t{reason}")
            bad += len(problems)
    print(f"{len(paths)} shard(s) checked: {bad} problem(s)", file=sys.stderr)
    return 1 if bad else 0
