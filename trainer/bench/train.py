"""``audioclr bench train``: how fast one process trains, against a bare PyTorch loop.

Three measurements of the same model, batch and precision:

  (a) bare:      model + NT-Xent + SGD in a plain loop, the batch already on the device;
  (b) synthetic: audioclr's training step (engine, objective, telemetry, checks) fed by
                 ``data.backend: synthetic``, one fixed batch on the device;
  (c) real:      the same step fed from shards (``--data``) through each back end, with
                 the recipe's augmentation chain (``--config``, or none); with ``--formats``
                 the shards are converted to each clip format first (``audioclr shard
                 convert``) and every back end runs on every format.

b/a is what the trainer's machinery costs; c/b tells input-bound (> 1) from
compute-bound (1.0). Each runs ``--warmup`` steps, then times ``--steps`` in windows of 5,
(a) and (b) taking turns, and keeps the median window; a table and a JSON record come out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataio.backends.batch import Placement
from dataio.backends.registry import backend_class, open_source
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest
from dataio.schema import cli_number
from dataio.writing.convert import convert_corpus
from dataio.writing.shard_writer import Encoding
from trainer.commands import run_guarded
from trainer.models.encoders import build_encoder
from trainer.models.heads import ContrastiveModel, ProjectionHead
from trainer.objectives.ntxent import nt_xent
from trainer.parallel.device import PRECISIONS, autocast_dtype, pick_device
from trainer.parallel.engines import ENGINES
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import Pretrainer

log = logging.getLogger("audioclr.bench_train")


def bare_step(args, device: torch.device, frames: int):
    """(a): no engine, no checks; autocast and channels-last as asked. Returns one step."""
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder, in_channels=1, width=args.width)
    model = ContrastiveModel(encoder, ProjectionHead(encoder.embedding_dim)).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile == "on":
        model.encoder.compile()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    views = torch.randn(args.batch, 2, 1, args.n_mels, frames, device=device)
    dtype = autocast_dtype(args.precision, device)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = model(views)["z"]
            loss = nt_xent(z, z, 0, temperature=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def timed(steps: dict, args, device: torch.device, window: int = 5) -> dict:
    """Per-step time of each of ``steps`` (name -> one step): the median over windows of
    ``window`` steps, the loops' windows taken in turn so that a busy moment of the
    machine or a drift of its clock touches them alike; after ``args.warmup`` steps each."""
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    windows: dict[str, list[float]] = {name: [] for name in steps}
    for first in range(0, args.steps, window):
        n = min(window, args.steps - first)
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            _sync(device)
            windows[name].append((time.perf_counter() - start) / n)
    out = {}
    for name, per_step in windows.items():
        seconds = statistics.median(per_step)
        out[name] = {"ms_per_step": 1e3 * seconds, "clips_per_second": args.batch / seconds,
                     "ms_per_step_windows": [round(1e3 * t, 2) for t in per_step]}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_step(args, backend: str, shards: str, run_dir: Path):
    """(b) and (c): audioclr's own step, fed by ``backend``; (the step, the trainer)."""
    overrides = [f"run_dir={run_dir}", f"data.backend={backend}", *_overrides(args), f"data.shards={shards}",
                 *args.set]
    if not backend_class(backend).reads_shards or not args.config:  # no chain on a fixed synthetic batch
        overrides.append("augment={}")
    cfg = load_config(PretrainConfig, args.config, overrides)
    trainer = Pretrainer(cfg)
    trainer.open_run()
    place = Placement(rank=trainer.info.rank, world_size=trainer.info.world_size, seed=cfg.seed,
                      device=trainer.device, steps=trainer.steps_per_epoch)
    trainer.source = open_source(cfg.data, trainer.manifest, cfg.frontend, trainer.augmenter, place)
    batches = _endless(trainer)
    return (lambda: trainer.train_step(next(batches))), trainer


def _endless(trainer):
    epoch = 0
    while True:
        yield from trainer._timed(trainer.source.epoch(epoch, 0))
        epoch += 1


def _overrides(args) -> list[str]:
    """The config overrides that size (b) and (c) like (a)."""
    return [f"data.batch_size={args.batch}", f"data.view_seconds={args.view_seconds}", f"frontend.n_mels={args.n_mels}",
            f"model.encoder={args.encoder}", f"model.width={args.width}", f"train.precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}", f"train.engine={args.engine}",
            f"train.compile={args.compile}", f"train.device={args.device}", "train.max_steps=1000000000",
            "train.log_every=1000000000", "train.ckpt_every=1000000000", "train.progress=false",
            "train.tensorboard=false", "optim.lr=0.01", "optim.warmup_steps=0", "objective.name=simclr",
            "objective.temperature=0.2", f"data.num_workers={args.workers}"]


def data_rows(args, tmp: Path) -> list[tuple[str, str, str]]:
    """(row name, back end, shard folder) of each real-data loop (c): every back end on
    ``--data``, or with ``--formats`` on ``--data`` converted to each format."""
    backends = [b for b in args.backends.split(",") if b]
    if not args.formats:
        return [(backend, backend, args.data) for backend in backends]
    source = load_manifest(args.data)
    frontend = load_config(PretrainConfig, args.config, [*_overrides(args), "data.shards=unused", *args.set]).frontend
    rows = []
    for name in args.formats.split(","):
        folder = args.data
        if name != source.clip_format:
            folder = str(tmp / f"corpus-{name}")
            convert_corpus(args.data, folder, Encoding.named(name, frontend), progress=False)
        rows += [(f"{backend} {name}", backend, folder) for backend in backends]
    return rows


def run(args) -> dict:
    device = pick_device(args.device, 0)
    frontend = FrontendConfig(n_mels=args.n_mels)
    frames = frontend.num_frames(int(round(args.view_seconds * frontend.sample_rate)))
    report = {"encoder": args.encoder, "width": args.width, "batch": args.batch, "views": [2, 1, args.n_mels, frames],
              "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
              "engine": args.engine, "overrides": args.set,
              "device": str(device), "threads": torch.get_num_threads(), "rows": {}}
    rows = report["rows"]
    with tempfile.TemporaryDirectory() as tmp:
        step, trainer = trainer_step(args, "synthetic", "", Path(tmp) / "synthetic")
        try:
            rows.update(timed({"bare": bare_step(args, device, frames), "synthetic": step}, args, device))
        finally:
            trainer.close()
        for name, backend, folder in data_rows(args, Path(tmp)) if args.data else []:
            try:
                step, trainer = trainer_step(args, backend, folder, Path(tmp) / name.replace(" ", "-"))
                try:
                    rows[name] = timed({name: step}, args, trainer.device)[name]
                    tel = trainer.telemetry
                    rows[name]["data_wait_fraction"] = tel.wait / max(tel.wait + tel.busy, 1e-12)
                finally:
                    trainer.close()
            except Exception as err:  # noqa: BLE001 -- a missing DALI, a bad shard folder: a row says so
                rows[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    report["threads"] = torch.get_num_threads()  # as train.threads set them
    base, synthetic = rows["bare"]["ms_per_step"], rows["synthetic"]["ms_per_step"]
    rows["synthetic"]["vs_bare"] = synthetic / base
    for name, row in rows.items():
        if name not in ("bare", "synthetic") and "ms_per_step" in row:
            row["vs_synthetic"] = row["ms_per_step"] / synthetic
    return report


def table(report: dict) -> str:
    lines = [f"{report['encoder']} width {report['width']}, batch {report['batch']} x views "
             f"{report['views']}, {report['precision']}, channels_last={report['channels_last']}, "
             f"compile={report['compile']}, "
             f"engine {report['engine']}, {report['device']} ({report['threads']} threads)",
             "| loop | clips/s | ms/step | ratio | data wait |", "|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | - | - | failed: {row['error']} | - |")
            continue
        ratio = (f"{row['vs_bare']:.3f} x bare" if "vs_bare" in row else
                 f"{row['vs_synthetic']:.3f} x synthetic" if "vs_synthetic" in row else "1")
        wait = f"{100 * row['data_wait_fraction']:.1f}%" if "data_wait_fraction" in row else "-"
        lines.append(f"| {name} | {row['clips_per_second']:.0f} | {row['ms_per_step']:.1f} | {ratio} | {wait} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--width", type=cli_number(int, 4), default=32)
    p.add_argument("--batch", type=cli_number(int, 2), default=64, help="clips per step (two views each)")
    p.add_argument("--view-seconds", type=cli_number(float, 0, above=True), default=1.0)
    p.add_argument("--n-mels", type=cli_number(int, 1), default=64)
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", default="off", choices=("off", "on"),
                   help="torch.compile the encoder in (a) and (b, c) alike")
    p.add_argument("--engine", default="ddp", choices=tuple(ENGINES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--steps", type=cli_number(int, 1), default=20, help="timed steps per loop")
    p.add_argument("--warmup", type=cli_number(int, 0), default=3, help="untimed steps first")
    p.add_argument("--data", help="shard folder for the real-data rows (c)")
    p.add_argument("--backends", default="torch,dali", help="back ends for (c)")
    p.add_argument("--workers", type=cli_number(int, 0), default=2, help="data.num_workers for (c)")
    p.add_argument("--config", help="recipe whose augmentation chain (c) runs")
    p.add_argument("--formats", default="", help="clip formats for (c), e.g. flac,pcm16,logmel: --data converted "
                   "to each (logmel with the recipe's front end), every back end on each")
    p.add_argument("--out", help="write the JSON record here too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a pretrain config override for (b) and (c), e.g. --set data.prefetch=4 (repeatable)")
    args = p.parse_args(argv)

    def work() -> int:
        report = run(args)
        print(table(report))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return 0
    return run_guarded("audioclr bench train", work, log_level=logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
