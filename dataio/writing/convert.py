"""``audioclr shard convert SRC --format F --out DST``: an existing corpus re-encoded in
another clip format, without the original audio.

Every shard of SRC (a folder or a URL) becomes the shard of the same number in DST,
with the same samples in the same order: the same keys, the same clip JSON (indices,
labels, folds, splits), only the audio member re-encoded (flac <-> pcm16 are lossless
both ways: both are the same 16-bit samples; -> logmel computes the front end's
log-mel of those samples). Shards are converted in parallel, each written under a
temporary name and renamed; the manifest comes last, so a conversion that fails part
way leaves no manifest and the half-written corpus is never read as whole. A logmel
corpus cannot be converted back: it holds no audio.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from dataio.errors import ShardWriteError
from dataio.formats.codec import ClipCodec
from dataio.frontend import FrontendConfig, one_torch_thread
from dataio.reading.manifest import Manifest, ShardInfo, load_manifest
from dataio.reading.remote import Retry, is_url, shown, tar_samples
from dataio.recipes import read_recipe
from dataio.schema import build_section
from dataio.workers import shut_down, worker_pool
from dataio.writing.clip_encoding import encode_clip
from dataio.writing.publish import Publisher
from dataio.writing.shard_writer import (
    REJECTED_NAME,
    Encoding,
    check_encoding,
    prepare_out_dir,
    refuse_output_over_input,
    remove_our_files,
)
from dataio.writing.tar_writer import ShardSink


def check_conversion(manifest: Manifest, encoding: Encoding) -> None:
    """ShardWriteError unless ``manifest``'s corpus can be written as ``encoding`` asks."""
    if not manifest.format.is_wave:
        raise ShardWriteError(f"{manifest.where} is a {manifest.clip_format} corpus: it holds log-mels, not audio, "
                              f"so it cannot be converted (shard the original audio again instead)")
    if manifest.clip_format == encoding.clip_format:
        raise ShardWriteError(f"{manifest.where} is already a {encoding.clip_format} corpus")
    check_encoding(encoding, manifest.sample_rate)


def convert_shard(location: str, number: int, expected: int, codec: ClipCodec, encoding: Encoding,
                  out_dir: str) -> ShardInfo:
    """Re-encode one shard into ``out_dir/shard-<number>.tar`` (+ its DALI index)."""
    problems: list[Exception] = []

    def on_error(err: Exception) -> bool:
        problems.append(err)
        return True

    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)  # the pool is the parallelism
    sink = ShardSink(Path(out_dir), 0, 0, first=number)
    count = 0
    for sample in tar_samples(location, on_error, Retry()):
        key = sample["__key__"]
        if codec.ext not in sample or "json" not in sample:
            raise ShardWriteError(f"{shown(location)}: sample {key} has no .{codec.ext} or .json member")
        try:
            pcm = codec.format.pcm(sample[codec.ext], codec)
        except Exception as err:  # noqa: BLE001 -- named, and the conversion stops
            raise ShardWriteError(f"{shown(location)}: member {key}.{codec.ext} does not read ({err}); list the "
                                  f"broken members with `audioclr check-shards`") from None
        members = [(encoding.ext, encode_clip(encoding, pcm, codec.sample_rate)) if ext == codec.ext else
                   (ext, bytes(data)) for ext, data in sample.items() if not ext.startswith("__")]
        sink.add(key, members)
        count += 1
    if problems or count != expected:
        raise ShardWriteError(f"{shown(location)}: read {count} of the {expected} samples the manifest lists"
                              + (f" ({problems[-1]!r})" if problems else ""))
    sink.close()
    return sink.shards[0]


def convert_corpus(src: str | Path, out: str, encoding: Encoding, *, overwrite: bool = False, workers: int = 0,
                   progress: bool = True) -> Manifest:
    """Write the corpus at ``src`` (folder or URL) as ``encoding`` says into ``out`` (a
    folder, or a writable folder URL: each shard uploaded as it is complete, the manifest
    last); returns the new manifest. ``out`` may not be ``src`` or lie inside it."""
    return convert_manifest(load_manifest(src), out, encoding, overwrite=overwrite, workers=workers,
                            progress=progress)


def convert_manifest(manifest: Manifest, out: str, encoding: Encoding, *, overwrite: bool = False,
                     workers: int = 0, progress: bool = True) -> Manifest:
    """:func:`convert_corpus` of the shards ``manifest`` lists (all of a corpus, or a part
    of one: ``bench data`` converts a bounded sample)."""
    src = manifest.root
    refuse_output_over_input(src, out)
    if encoding.format.stores_frontend and encoding.frontend is None:  # the default front end at the corpus's rate
        encoding = Encoding(encoding.clip_format, FrontendConfig(sample_rate=manifest.sample_rate))
    check_conversion(manifest, encoding)
    publisher = Publisher(out, overwrite) if is_url(out) else None
    staging = Path(tempfile.mkdtemp(prefix="audioclr-convert-")) if publisher else Path(out)
    try:
        if not publisher:
            prepare_out_dir(staging, overwrite)
        shards = _shards_or_nothing(manifest, staging, encoding, workers, publisher, progress)
        rejected = dict(manifest.rejected)
        if not publisher and not is_url(src) and (Path(src) / REJECTED_NAME).is_file():
            shutil.copyfile(Path(src) / REJECTED_NAME, staging / REJECTED_NAME)
        else:
            rejected.pop("list", None)  # the list stays with the original corpus
        fields = encoding.manifest_fields()
        converted = Manifest(dataset=manifest.dataset, sample_rate=manifest.sample_rate,
                             num_clips=manifest.num_clips, shards=shards, vocabulary=manifest.vocabulary,
                             multi_label=manifest.multi_label, rejected=rejected, root=out,
                             fold_names=manifest.fold_names, **fields)
        converted.write(staging)
        if publisher:
            publisher.finish(staging)
    finally:
        if publisher:
            shutil.rmtree(staging, ignore_errors=True)
    return converted


def _shards_or_nothing(manifest: Manifest, staging: Path, encoding: Encoding, workers: int, publisher,
                       progress: bool) -> list[ShardInfo]:
    """:func:`_convert_shards`; a stop or a failure (a full disk) leaves no ``.tmp`` file."""
    try:
        return _convert_shards(manifest, staging, encoding, workers, publisher, progress)
    except BaseException:
        remove_our_files(staging, unfinished_only=True)
        raise


def _convert_shards(manifest: Manifest, staging: Path, encoding: Encoding, workers: int, publisher,
                    progress: bool) -> list[ShardInfo]:
    """Every shard converted into ``staging`` (uploaded and removed there with a publisher)."""
    codec = ClipCodec.of(manifest)
    locations = [str(p) for p in manifest.shard_paths()]
    workers = min(workers or os.cpu_count() or 1, len(locations))
    jobs = [(loc, i, s.count, codec, encoding, str(staging)) for i, (loc, s) in enumerate(zip(locations,
                                                                                             manifest.shards))]
    done: dict[int, ShardInfo] = {}
    with tqdm(total=manifest.num_clips, unit="clip", desc="convert", disable=not progress) as bar:
        if workers <= 1:  # in this process, on one torch thread as a pool worker would be
            results = (_in_one_thread(convert_shard, job) for job in jobs)
        else:  # spawn: the parent may hold OpenMP threads a forked child would wait on
            pool = worker_pool(workers)
            results = pool.map(convert_shard, *zip(*jobs))
        try:
            for number, info in enumerate(results):
                done[number] = info
                bar.update(info.count)
                if publisher:
                    publisher.shard(staging / info.url, staging / info.index_file)
        finally:
            if workers > 1:
                shut_down(pool)
    return [done[i] for i in range(len(jobs))]


def _in_one_thread(fn, args):
    with one_torch_thread():
        return fn(*args)


def frontend_from_recipe(path: str | None, sample_rate: int) -> FrontendConfig:
    """The ``frontend:`` section of a recipe YAML, over its ``base:`` recipes (defaults
    without a recipe, at ``sample_rate``)."""
    if not path:
        return FrontendConfig(sample_rate=sample_rate)
    return build_section(FrontendConfig, read_recipe(path).get("frontend") or {}, "frontend.")
