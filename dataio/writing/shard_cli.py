"""Command-line pieces of ``audioclr shard SRC --layout L --out DIR [--format F]`` and
``audioclr shard convert SRC --format F --out DST``."""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from dataio.errors import RemoteError, ShardWriteError
from dataio.formats import FORMATS, clip_format
from dataio.reading.manifest import load_manifest
from dataio.reading.remote import is_url, shown
from dataio.schema import cli_number
from dataio.writing.publish import Publisher
from dataio.writing.shard_pipeline import WriteSettings, write_parts
from dataio.writing.shard_writer import REJECTED_NAME, Encoding, refuse_output_over_input
from dataio.writing.sources import layout_options, listing_parts, write_missing

FORMAT_HELP = "clip format of the members: " + ", ".join(f"{f.name} ({f.summary})" for f in FORMATS.values())

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# layout-specific options: converter keyword -> command-line flag (None on the command line: not given)
LAYOUT_FLAGS = {"audio_dir": "--audio-dir", "audio_pattern": "--audio-pattern",
                "subsets": "--subsets", "esc10": "--esc10", "split_seed": "--split-seed"}


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
        "label), csv (path,label[,fold] rows; folds integers, or names numbered 1..N in sorted order), "
        "or a dataset's own layout: audioset, fsd50k, fsdnoisy18k, esc50, us8k, gtzan")
    add("--out", required=True, help="folder for the shards and manifest, or its URL (s3://, gs://, any "
        "writable fsspec URL: each shard is uploaded as it is complete, the manifest last)")
    add("--sample-rate", type=cli_number(int, 1), default=16000, help="rate of the shards' audio, Hz")
    add("--shard-size", type=cli_number(int, 0), default=0,
        help="clips per shard (default 1000 unless --shard-bytes is given)")
    add("--shard-bytes", type=parse_size, default=0, help="payload per shard, e.g. 64MB or 1GB")
    add("--seed", type=cli_number(int, 0), default=0, help="seed of the order of clips in the shards")
    add("--workers", type=cli_number(int, 0), default=0, help="worker processes (0: one per CPU)")
    add("--min-seconds", type=cli_number(float, 0), default=0.025, help="reject clips shorter than this, seconds "
        "(shorter ones are padded when trained on: notes and drum hits are short)")
    add("--dataset", default=None, help="dataset name in the manifest (default: SRC's name)")
    add("--overwrite", action="store_true", help="replace the shards in a non-empty --out")
    _add_format_arguments(parser)
    _add_layout_arguments(parser)


def _add_format_arguments(parser: argparse.ArgumentParser, default: str | None = "flac") -> None:
    parser.add_argument("--format", default=default, required=default is None, choices=tuple(FORMATS),
                        help=FORMAT_HELP)
    parser.add_argument("--config", default=None, help="--format logmel: the recipe whose frontend: section "
                        "computes the log-mels (default: the default front end at the shards' rate)")


def _encoding(args: argparse.Namespace, sample_rate: int | None) -> Encoding:
    """The --format (and, for logmel, --config's front end, or the default one at
    ``sample_rate``; None: at the corpus's rate, decided later) as an Encoding."""
    features = clip_format(args.format).stores_frontend
    if args.config and not features:
        raise ShardWriteError(f"--config gives the front end of a logmel corpus; --format {args.format} has none")
    if not features or not (args.config or sample_rate):
        return Encoding(args.format)
    from dataio.writing.convert import frontend_from_recipe  # deferred: the front end brings torch, only for logmel
    return Encoding(args.format, frontend_from_recipe(args.config, sample_rate))


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``audioclr shard convert SRC --format F --out DST``."""
    add = parser.add_argument
    add("src", metavar="SRC", help="a shard folder (with manifest.json), or its URL")
    add("--out", required=True, help="folder for the converted corpus, or a writable folder URL (s3://, ...)")
    add("--workers", type=cli_number(int, 0), default=0, help="processes, one shard each (0: one per CPU)")
    add("--overwrite", action="store_true", help="replace the corpus in a non-empty --out")
    _add_format_arguments(parser, default=None)


# what bad input raises (ShardWriteError, a layout's, a manifest's and a config's errors are
# ValueErrors): exit 2 with one line
SHARD_INPUT_ERRORS = (ValueError, OSError, RemoteError)


def run_convert(args: argparse.Namespace) -> int:
    """Run ``audioclr shard convert`` (bad input raises: SHARD_INPUT_ERRORS; nothing
    half-written is left with a manifest)."""
    encoding = _encoding(args, None)
    from dataio.writing.convert import convert_corpus  # deferred: `audioclr shard` plans without importing torch
    manifest = convert_corpus(args.src, args.out, encoding, overwrite=args.overwrite, workers=args.workers)
    where = shown(args.out) if is_url(args.out) else args.out
    print(f"converted {manifest.num_clips} clips in {len(manifest.shards)} shard(s) to {encoding.clip_format}: "
          f"{where} ({sum(s.bytes for s in manifest.shards) / 1e6:.1f} MB)")
    return 0



def _add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that only some layouts take; all default to None, meaning "not given"."""
    add = parser.add_argument_group("layout options (each for the layouts named)").add_argument
    add("--audio-dir", type=Path, default=None,
        help="audioset: folder of the downloaded audio (default SRC/audio)")
    add("--audio-pattern", default=None,
        help="audioset: file name pattern under --audio-dir with {ytid}, {subset}, {start}, "
             "{end}, {start_ms}, {end_ms}, e.g. 'Y{ytid}.wav' (default: try the common ones)")
    add("--subsets", default=None,
        help="audioset: segment CSVs to read (balanced_train,unbalanced_train,eval); "
             "fsdnoisy18k: train subsets to write (clean,noisy_small,noisy; test always)")
    add("--esc10", action="store_true", default=None, help="esc50: only the ESC-10 clips")
    add("--split-seed", type=cli_number(int, 0), default=None,
        help="gtzan: seed of the stratified 70/15/15 train/val/test split (default 0)")


def _layout_options(args: argparse.Namespace) -> dict:
    """The layout options given on the command line; one the layout does not take is an error."""
    accepted = layout_options(args.layout)  # an unknown layout fails here, listing the valid ones
    given = {key: getattr(args, key, None) for key in LAYOUT_FLAGS}
    given = {key: value for key, value in given.items() if value is not None}
    for key in given:
        if key not in accepted:
            takes = [LAYOUT_FLAGS[k] for k in accepted if k in LAYOUT_FLAGS]
            raise ValueError(f"option {LAYOUT_FLAGS[key]} does not apply to layout {args.layout}"
                             f" (it takes {', '.join(takes) or 'no layout options'})")
    return given


def run_shard(args: argparse.Namespace) -> int:
    """Run ``audioclr shard`` (bad input raises: SHARD_INPUT_ERRORS)."""
    src = Path(args.src)
    encoding = _encoding(args, args.sample_rate)
    options = _layout_options(args)
    if not src.exists():
        raise ShardWriteError(f"SRC {src} does not exist")
    refuse_output_over_input(src, args.out)
    parts = listing_parts(args.layout, src, **options)  # read by the workers
    dataset = args.dataset or (src.name if src.is_dir() else src.stem) or "dataset"
    settings = WriteSettings(dataset=dataset, sample_rate=args.sample_rate, min_seconds=args.min_seconds,
                             encoding=encoding)
    publisher = Publisher(args.out, args.overwrite) if is_url(args.out) else None
    staging = Path(tempfile.mkdtemp(prefix="audioclr-shard-")) if publisher else Path(args.out)
    try:
        report, listing = write_parts(parts, staging, settings, shard_size=args.shard_size,
                                      shard_bytes=args.shard_bytes, seed=args.seed, workers=args.workers,
                                      overwrite=args.overwrite, on_shard=publisher.shard if publisher else None,
                                      no_clips=f"no audio clips found in {src} (layout {args.layout})")
        if listing.missing:
            print(f"{len(listing.missing)} listed clips missing on disk")
        if listing.fold_names:
            _record_fold_names(report.out_dir, listing.fold_names)
        missing_path = write_missing(listing, report.out_dir)
        if publisher:
            publisher.finish(staging)
    finally:
        if publisher:
            shutil.rmtree(staging, ignore_errors=True)
    where = shown(args.out) if publisher else str(report.out_dir)
    print(report.summary().replace(str(report.out_dir), where))
    print(f"rejected clips and reasons: {where}/{REJECTED_NAME}")
    if listing.missing:
        print(f"listed clips missing on disk: {where}/{missing_path.name}")
    if listing.fold_names:
        print(f"{len(listing.fold_names)} named folds numbered 1-{len(listing.fold_names)} in name order; "
              f"their names are the manifest's fold_names")
    return 0


def _record_fold_names(folder: Path, fold_names: dict[int, str]) -> None:
    """Add the fold names to the manifest ``write_shards`` just wrote in ``folder`` (rewritten
    atomically; for a URL this is the staging folder, whose manifest is uploaded last)."""
    manifest = load_manifest(folder, check_files=False)
    manifest.fold_names = dict(fold_names)
    manifest.write(folder)
