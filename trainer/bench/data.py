"""Data benchmark: clips per second of each back end next to the decode limit, and of
each clip format.

The limit is measured in the same run on the same shards: plain in-process decoding of
what a loader decodes of every clip member, its views' crops (FLAC: soundfile seeks and
decodes those samples; the decode-free formats: the bytes as samples or frames), on the
same number of cores (one process per core, each reading its share of the shards). Each
back end is timed producing log-mel batches on the training device (the CPU here, the
GPU where there is one). On a GPU machine the GPU mel stage alone is timed too
(torchaudio and DALI), on 1 s waves already on the device.

With ``--config RECIPE.yaml`` each back end is timed twice: with the recipe's
augmentation chain (and its front end and view length) and without it, so the chain's
cost to the data path is the ratio of the two.

With ``--shards`` every figure is measured on a bounded sample of the corpus (its first
whole shards holding ``--clips`` clips, 2,000 by default), so the benchmark costs the same
on a thousand clips as on AudioSet and never copies the corpus.

With ``--formats flac,pcm16,logmel`` the corpus (the sample) is converted to each format (``audioclr
shard convert``) and each is measured in the same run: bytes on disk per second of
audio, and the clips per second one loader core gives when the chain runs on the device
(what a loader worker does then: read the shard, open the member, cut the views, batch;
timed in this process, after a warm-up batch), with the ratio to FLAC's.

    audioclr bench data [--shards DIR] [--cores N] [--clip-seconds 10] [--config configs/demo.yaml]
                        [--formats flac,pcm16,logmel] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dataio.atomic import write_text_atomically
from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
from dataio.backends.dali_pipeline import logmel_nodes
from dataio.backends.registry import open_source
from dataio.backends.torch_pipeline import WaveBatches
from dataio.backends.views import crop_starts
from dataio.formats import FORMATS
from dataio.formats.codec import ClipCodec, check_recipe_frontend
from dataio.formats.logmel import stored_frontend
from dataio.frontend import FrontendConfig, LogMel
from dataio.reading.manifest import load_manifest
from dataio.reading.remote import is_url, tar_samples
from dataio.schema import cli_number
from dataio.workers import worker_pool
from dataio.writing.convert import convert_manifest, frontend_from_recipe
from dataio.writing.shard_pipeline import write_shards
from dataio.writing.shard_writer import Encoding
from dataio.writing.sources.demo import RATE, demo_items, synth_loader
from trainer.commands import run_guarded
from trainer.train.config import PretrainConfig, load_config

SYNTH_CLIPS = 256  # the corpus synthesized without --shards
SAMPLE_CLIPS = 2000  # with --shards: what is read of the corpus (whole shards), whatever its size


def _decode_shards(paths: list[str], codec: ClipCodec, read: int, views: int) -> tuple[int, float]:
    """(clips, seconds) of decoding the views of every clip in ``paths``."""
    clips, rng, start = 0, np.random.default_rng(0), time.perf_counter()
    for path in paths:
        for sample in tar_samples(path, wds.reraise_exception):  # a path or a URL (streamed)
            clip = codec.open(sample[codec.ext])
            clip.cut(crop_starts(clip.length, read, views, rng), read)
            clips += 1
    return clips, time.perf_counter() - start


def decode_limit(manifest, cores: int, read: int, views: int) -> float:
    """Clips per second of decoding what a loader decodes of each clip, ``views`` crops of
    ``read`` samples (frames for logmel; FLAC seeks and decodes only those), one process
    per core: no back end reads clips faster. (Decoding each clip whole was no limit: a
    loader reading 1-s views of longer FLAC clips beat it.) Each process times its own
    share, and the limit is the sum of their rates: a pool worker still starting (importing,
    on a busy machine) is not counted as decoding time."""
    paths = [str(p) for p in manifest.shard_paths()]
    parts = [paths[i::cores] for i in range(cores)]
    codec = ClipCodec.of(manifest)
    with worker_pool(cores) as pool:
        list(pool.map(_decode_shards, [[p] for p in paths[:cores]], [codec] * cores, [read] * cores,
                      [views] * cores))  # warm the cache and pool
        timed = list(pool.map(_decode_shards, parts, [codec] * len(parts), [read] * len(parts), [views] * len(parts)))
    return sum(clips / seconds for clips, seconds in timed if clips)


def _frontend(manifest, recipe: dict) -> FrontendConfig:
    return recipe.get("frontend") or (stored_frontend(manifest.frontend) if manifest.format.stores_frontend
                                      else FrontendConfig(sample_rate=manifest.sample_rate))


def views_read(manifest, pairs: int, recipe: dict | None = None) -> tuple[int, int]:
    """(samples, or frames, read per view; views per clip) of the back ends' rows without
    the chain: what a loader decodes of each clip."""
    recipe = recipe or {}
    view_seconds = recipe.get("view_seconds", 1.0)
    cfg = DataConfig(shards=str(manifest.root), pairs_per_clip=pairs, view_seconds=view_seconds)
    augmenter = build_augmenter({}, _frontend(manifest, recipe), view_seconds, num_views=cfg.num_views,
                                pairs_per_clip=pairs, seed=0, clip_format=manifest.clip_format)
    read = augmenter.input_samples if ClipCodec.of(manifest).is_wave else augmenter.mel_frames_in
    return read, cfg.num_views * pairs


def loader_rate(manifest, seconds: float, batch_size: int, pairs: int, view_seconds: float,
                frontend: FrontendConfig) -> float:
    """Clips per second of one loader worker's work when the chain runs on the device
    (read, open, cut the views, batch), in this process on one core."""
    cfg = DataConfig(shards=str(manifest.root), batch_size=batch_size, num_workers=0, pairs_per_clip=pairs,
                     view_seconds=view_seconds)
    augmenter = build_augmenter({}, frontend, view_seconds, num_views=cfg.num_views, pairs_per_clip=pairs, seed=0,
                                clip_format=manifest.clip_format)
    batches = iter(WaveBatches(cfg, manifest, augmenter, Placement(steps=10**9), epoch=0, start_step=0,
                               in_workers=False))
    next(batches)  # the shuffle buffer fills
    clips, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        clips += len(next(batches).keys) // pairs
    return clips / (time.perf_counter() - start)


def audio_seconds(manifest) -> float:
    """Seconds of audio in a corpus (the clips' JSON durations)."""
    return sum(float(json.loads(sample["json"]).get("duration", 0.0)) for path in manifest.shard_paths()
               for sample in tar_samples(str(path), wds.reraise_exception))


def format_rows(manifest, formats: list[str], args, frontend: FrontendConfig, tmp: Path) -> dict:
    """Per clip format: bytes on disk per second of audio, clips/s per loader core, and
    both as ratios to FLAC's (the corpus converted to each format under ``tmp``)."""
    seconds = audio_seconds(manifest)
    rows = {}
    for name in formats:
        corpus = manifest
        if name != manifest.clip_format:
            encoding = Encoding.named(name, frontend)
            convert_manifest(manifest, str(tmp / name), encoding, overwrite=True, progress=False)
            corpus = load_manifest(tmp / name)
        rate = loader_rate(corpus, args.seconds, args.batch_size, args.pairs, frontend_view(args), frontend)
        rows[name] = {"bytes_per_audio_second": sum(s.bytes for s in corpus.shards) / seconds,
                      "loader_clips_per_second_per_core": rate}
    base = rows.get("flac")
    for row in rows.values() if base else ():
        row["loader_vs_flac"] = row["loader_clips_per_second_per_core"] / base["loader_clips_per_second_per_core"]
        row["bytes_vs_flac"] = row["bytes_per_audio_second"] / base["bytes_per_audio_second"]
    return {"audio_seconds": seconds, "rows": rows}


def frontend_view(args) -> float:
    return getattr(args, "view_seconds", 1.0) or 1.0


def backend_rate(manifest, backend: str, cores: int, batch_size: int, pairs: int, seconds: float,
                 device: torch.device, recipe: dict | None = None) -> float:
    """Clips per second of one back end's log-mel batches on ``device`` (after warm-up);
    ``recipe`` = {"augment", "frontend", "view_seconds"} of a recipe (None: no augmentation)."""
    recipe = recipe or {}
    frontend = _frontend(manifest, recipe)
    check_recipe_frontend(frontend, manifest)
    view_seconds = recipe.get("view_seconds", 1.0)
    # one endless epoch: steady-state throughput, not loader start-up (real epochs are long)
    cfg = DataConfig(shards=str(manifest.root), backend=backend, batch_size=batch_size, num_workers=cores,
                     pairs_per_clip=pairs, steps_per_epoch=10**9, view_seconds=view_seconds)
    augmenter = build_augmenter(recipe.get("augment"), frontend, view_seconds, num_views=cfg.num_views,
                                pairs_per_clip=pairs, seed=0, clip_format=manifest.clip_format)
    place = Placement(device=device, steps=steps_per_epoch(cfg, manifest, 1))
    source = open_source(cfg, manifest, frontend, augmenter, place)
    clips, start, epoch = 0, None, 0
    while True:
        for i, batch in enumerate(source.epoch(epoch, 0)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if start is None and i == 1:
                start = time.perf_counter()  # the first batch pays for worker start-up
            elif start is not None:
                clips += batch.views.shape[0] // pairs
                if time.perf_counter() - start > seconds:
                    return clips / (time.perf_counter() - start)
        epoch += 1


def load_recipe(path: str) -> dict:
    """The parts of a pretraining recipe the data path depends on."""
    cfg = load_config(PretrainConfig, path, ["data.shards=unused"])
    return {"augment": cfg.augment, "frontend": cfg.frontend, "view_seconds": cfg.data.view_seconds}


def gpu_mel_rates(batch: int = 2048, repeats: int = 20) -> dict:
    """Clips per second of the mel stage alone on 1 s waves already on the GPU."""
    cfg = FrontendConfig()
    waves = torch.randn(batch, cfg.sample_rate, device="cuda") * 0.1
    logmel = LogMel(cfg).cuda()
    logmel(waves)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        logmel(waves)
    torch.cuda.synchronize()
    rates = {"torchaudio_gpu_mel": batch * repeats / (time.perf_counter() - start)}
    try:
        rates["dali_gpu_mel"] = _dali_gpu_mel_rate(cfg, waves, repeats)
    except ImportError:
        pass
    return rates


def _dali_gpu_mel_rate(cfg: FrontendConfig, waves: torch.Tensor, repeats: int) -> float:
    from nvidia.dali import fn, pipeline_def  # deferred: DALI is heavy and optional

    host = [w for w in waves.cpu().numpy()]

    @pipeline_def
    def graph():
        return logmel_nodes([fn.external_source(source=lambda: host, device="gpu", cycle=False,
                                                batch=True, no_copy=False)], cfg)[0]

    pipe = graph(batch_size=len(host), num_threads=4, device_id=torch.cuda.current_device(),
                 prefetch_queue_depth=1)
    pipe.build()
    pipe.run()
    start = time.perf_counter()
    for _ in range(repeats):
        pipe.run()
    return len(host) * repeats / (time.perf_counter() - start)


def make_bench_shards(folder: Path, clips: int, clip_seconds: float) -> Path:
    items = demo_items(clips, seed=1, min_seconds=clip_seconds, max_seconds=clip_seconds)
    write_shards(items, folder, dataset="bench", sample_rate=RATE, shard_size=max(1, clips // 16),
                 loader=synth_loader, workers=0, progress=False)
    return folder


def run(args: argparse.Namespace) -> dict:
    """The benchmark's result, on ``args.shards`` or on a corpus synthesized for it (removed
    at the end, or at a stop)."""
    if args.shards:
        return measure(args, args.shards if is_url(args.shards) else Path(args.shards))
    with tempfile.TemporaryDirectory(prefix="audioclr-bench-") as tmp:
        return measure(args, make_bench_shards(Path(tmp), args.clips or SYNTH_CLIPS, args.clip_seconds))


def measure(args: argparse.Namespace, shards: str | Path) -> dict:
    """The decode limit and each back end's clips per second on ``shards`` (a sample of them)."""
    cores = args.cores or len(os.sched_getaffinity(0))
    corpus = load_manifest(shards)
    manifest = corpus.first_shards(args.clips or SAMPLE_CLIPS) if args.shards else corpus
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = load_recipe(args.config) if getattr(args, "config", None) else None
    plain = dict(recipe, augment={}) if recipe else None
    limit = decode_limit(manifest, cores, *views_read(manifest, args.pairs, plain))
    rows = {"decode_limit": limit}
    skipped: dict = {}
    formats = None
    if getattr(args, "formats", ""):
        frontend = frontend_from_recipe(args.config, manifest.sample_rate)
        with tempfile.TemporaryDirectory(prefix="audioclr-formats-") as where:
            formats = format_rows(manifest, args.formats.split(","), args, frontend, Path(where))
    for backend in (b for b in args.backends.split(",") if b):
        plain = dict(recipe, augment={}) if recipe else None
        rows[backend] = backend_rate(manifest, backend, cores, args.batch_size, args.pairs, args.seconds, device,
                                     plain)
        if recipe and recipe["augment"]:
            rows[f"{backend}+augment"] = backend_rate(manifest, backend, cores, args.batch_size, args.pairs,
                                                      args.seconds, device, recipe)
    result = {"cores": cores, "device": str(device), "shards": str(shards), "clips": corpus.num_clips,
              "sample": {"clips": manifest.num_clips, "shards": len(manifest.shards), "of_shards": len(corpus.shards)},
              "pairs_per_clip": args.pairs, "recipe": getattr(args, "config", None), "clips_per_second": rows,
              "ratio_to_limit": {k: v / limit for k, v in rows.items() if k != "decode_limit"}, "skipped": skipped,
              "clip_format": manifest.clip_format, "formats": formats}
    if device.type == "cuda":
        result["gpu_mel_clips_per_second"] = gpu_mel_rates()
    return result


def print_table(result: dict) -> None:
    print(f"device {result['device']}, {result['cores']} core(s), {result['clips']} clips, "
          f"pairs_per_clip {result['pairs_per_clip']}")
    sample = result.get("sample") or {}
    if sample and sample["clips"] < result["clips"]:
        print(f"measured on a sample: the first {sample['shards']} of {sample['of_shards']} shards, {sample['clips']} "
              f"of {result['clips']} clips (--clips sets it; nothing reads or copies the whole corpus)")
    if any(name.endswith("+augment") for name in result["clips_per_second"]):
        print(f"'+augment' rows: the augmentation chain, front end and view length of {result['recipe']}")
    print(f"{'pipeline':<16}{'clips/s':>12}{'per core':>12}{'/ limit':>10}")
    for name, rate in result["clips_per_second"].items():
        ratio = result["ratio_to_limit"].get(name)
        print(f"{name:<16}{rate:>12.1f}{rate / result['cores']:>12.1f}{'' if ratio is None else f'{ratio:.2f}':>10}")
    for name, why in result.get("skipped", {}).items():
        print(f"{name:<16}{'skipped: ' + why:>34}")
    for name, rate in result.get("gpu_mel_clips_per_second", {}).items():
        print(f"{name:<16}{rate:>12.0f}")
    if result.get("formats"):
        print_formats(result["formats"])


def print_formats(formats: dict) -> None:
    print(f"clip formats ({formats['audio_seconds']:.0f} s of audio): bytes on disk per second of audio, and "
          f"clips/s of one loader core (read, cut the views, batch; the chain on the device)")
    print(f"{'format':<10}{'bytes/s':>10}{'vs flac':>9}{'clips/s/core':>14}{'vs flac':>9}")
    for name, row in formats["rows"].items():
        print(f"{name:<10}{row['bytes_per_audio_second']:>10.0f}{row.get('bytes_vs_flac', float('nan')):>9.2f}"
              f"{row['loader_clips_per_second_per_core']:>14.0f}{row.get('loader_vs_flac', float('nan')):>9.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard folder or its URL; default: synthesize --clips clips of --clip-seconds")
    p.add_argument("--clips", type=cli_number(int, 1), default=None,
                   help=f"without --shards: clips to synthesize (default {SYNTH_CLIPS}); with --shards: the bounded "
                        f"sample, whole shards in manifest order, that the limit, the back ends and --formats read "
                        f"(default {SAMPLE_CLIPS})")
    p.add_argument("--clip-seconds", type=cli_number(float, 0, above=True), default=10.0)
    p.add_argument("--cores", type=cli_number(int, 0), default=0, help="0 = the cores this process may use")
    p.add_argument("--backends", default="torch,dali", help="back ends to time ('' = none)")
    p.add_argument("--batch-size", type=cli_number(int, 1), default=64)
    p.add_argument("--pairs", type=cli_number(int, 1), default=1, help="data.pairs_per_clip")
    p.add_argument("--seconds", type=cli_number(float, 0, above=True), default=20.0, help="timing window per back end")
    p.add_argument("--config", help="a pretraining recipe: also time each back end with its augmentation chain "
                   "(and, with --formats, compute the logmel corpus with its front end)")
    p.add_argument("--formats", default="", help="clip formats to compare (e.g. flac,pcm16,logmel): the corpus is "
                   "converted to each; bytes per second of audio and clips/s per loader core")
    p.add_argument("--view-seconds", type=cli_number(float, 0, above=True), default=1.0,
                   help="--formats: the views' length")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)

    def work() -> int:
        unknown = [f for f in args.formats.split(",") if f and f not in FORMATS]
        if unknown:
            raise ValueError(f"--formats: {', '.join(unknown)} is not a clip format; choose from "
                             f"{', '.join(FORMATS)}")
        result = run(args)
        print_table(result)
        if args.out:  # whole or not at all: a stop never leaves an earlier result cut short
            write_text_atomically(args.out, json.dumps(result, indent=1))
        return 0
    # a bad shard folder, recipe or format (ConfigError, ManifestError ... are ValueErrors): exit 2
    return run_guarded("audioclr bench data", work, input_errors=(ValueError, OSError))
