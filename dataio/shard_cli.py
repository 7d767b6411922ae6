"""Command-line pieces of ``audioclr shard SRC --layout L --out DIR``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dataio.shard_writer import REJECTED_NAME, ShardWriteError, write_shards

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional K/M/G/T suffix (x1024: "64MB", "1GiB")."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500000, 64MB, 1GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``audioclr shard SRC --layout L --out DIR``."""
    add = parser.add_argument
    add("src", type=Path, metavar="SRC", help="the dataset's folder (a CSV file for --layout csv)")
    add("--layout", default="folder", help="how SRC is organised: folder (one sub-folder per "
        "label), csv (path,label[,fold] rows), ...")
    add("--out", type=Path, required=True, help="folder for the shards and manifest")
    add("--sample-rate", type=int, default=16000, help="rate of the shards' audio, Hz")
    add("--shard-size", type=int, default=0,
        help="clips per shard (default 1000 unless --shard-bytes is given)")
    add("--shard-bytes", type=parse_size, default=0, help="payload per shard, e.g. 64MB or 1GB")
    add("--seed", type=int, default=0, help="seed of the order of clips in the shards")
    add("--workers", type=int, default=0, help="worker processes (0: one per CPU)")
    add("--min-seconds", type=float, default=0.1, help="reject clips shorter than this, seconds")
    add("--dataset", default=None, help="dataset name in the manifest (default: SRC's name)")
    add("--overwrite", action="store_true", help="replace the shards in a non-empty --out")


def run_shard(args: argparse.Namespace) -> int:
    """Run ``audioclr shard``; returns the exit status (2 with a one-line error on bad input)."""
    from dataio.sources import items_for_layout

    src = Path(args.src)
    try:
        if not src.exists():
            raise ShardWriteError(f"SRC {src} does not exist")
        items = items_for_layout(args.layout, src)
        if not items:
            raise ShardWriteError(f"no audio clips found in {src} (layout {args.layout})")
        dataset = args.dataset or (src.name if src.is_dir() else src.stem) or "dataset"
        report = write_shards(items, args.out, dataset=dataset, sample_rate=args.sample_rate,
                              shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                              seed=args.seed, workers=args.workers, min_seconds=args.min_seconds,
                              overwrite=args.overwrite)
    except (ValueError, OSError) as err:  # ShardWriteError, bad layouts and CSVs are ValueErrors
        print(f"audioclr shard: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"rejected clips and reasons: {report.out_dir / REJECTED_NAME}")
    return 0
