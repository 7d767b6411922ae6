"""How audioclr's costs grow with the corpus: cost per clip and peak memory per process
for synthetic corpora of N 1-s clips, and NPID's memory bank at a simulated 2M clips.

    audioclr bench scale --sizes 1000,10000,100000 --work /tmp/scale [--out scale.json]

For each N the tool writes a corpus of N one-second FLAC clips (a few distinct tones,
encoded once, so writing costs no decoding) and times, each in a fresh process whose
peak RSS (its largest process, workers included) is read from the kernel:

- ``check-shards`` (2 workers), ``shard convert --format pcm16`` (2 workers): per clip;
- ``bench data --backends torch`` (a bounded sample: its wall should not grow with N);
- the loader's first batch when resuming at the first and at the last step of an epoch
  (a seek should cost the same wherever it lands), and with ``--resume-run N`` the
  whole resumed run, launch to exit (one step and its checkpoint), at both places;
- ``shard`` from a folder of N WAV files (2 workers), for N up to ``--shard-max``;
- NPID's start-up (building the trainer: the bank slices; and from the rank's launch, its
  interpreter and imports included) and peak per rank on 2 gloo
  ranks, at N and at ``--npid-clips`` simulated clips (the synthetic back end).

Costs per clip are CPU seconds (user + system, all processes) over N; walls are quoted
where the claim is about waiting. A last table gives the growth from the smallest to the
largest N.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from dataio.reading.manifest import Manifest
from dataio.schema import cli_number
from dataio.writing.tar_writer import ShardSink

RATE, TONES = 16000, 16


def shipped_recipe(name: str) -> str:
    """configs/NAME: beside the package in a checkout (``pip install -e .`` or PYTHONPATH),
    else under the working directory (an image that installed the package and copied
    configs/ beside it, as docker/Dockerfile does)."""
    for folder in (Path(__file__).resolve().parents[2] / "configs", Path("configs")):
        if (folder / name).is_file():
            return str((folder / name).resolve())
    raise FileNotFoundError(f"configs/{name}: not beside the package nor under {Path.cwd()}")


def tones(seconds: float = 1.0) -> list[np.ndarray]:
    """TONES distinct int16 tones with a little noise."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(0)
    return [(8000 * np.sin(2 * np.pi * (110 * (k + 2)) * t) + 200 * rng.standard_normal(len(t))).astype(np.int16)
            for k in range(TONES)]


def make_corpus(folder: Path, n: int, shard_size: int = 1000) -> Path:
    """N 1-s FLAC clips as shards and a manifest (written directly: no audio files, no decoding)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoded = []
    for wave in tones():
        buf = io.BytesIO()
        sf.write(buf, wave, RATE, format="FLAC", subtype="PCM_16")
        encoded.append(buf.getvalue())
    sink = ShardSink(folder, shard_size, 0)
    for i in range(n):
        meta = {"index": i, "dataset": "scale", "labels": [f"c{i % 10}"], "split": "train", "fold": i % 5 + 1,
                "duration": 1.0}
        sink.add(f"clip{i:07d}", [("flac", encoded[i % TONES]), ("json", json.dumps(meta).encode())])
    sink.close()
    Manifest(dataset="scale", sample_rate=RATE, num_clips=n, shards=sink.shards,
             vocabulary=[f"c{k}" for k in range(10)]).write(folder)
    return folder


def make_wav_folder(folder: Path, n: int) -> Path:
    """N 1-s WAV files in 10 label folders (what `audioclr shard --layout folder` reads)."""
    waves = tones()
    for i in range(n):
        where = folder / f"c{i % 10}"
        where.mkdir(parents=True, exist_ok=True)
        sf.write(where / f"clip{i:07d}.wav", waves[i % TONES], RATE, subtype="PCM_16")
    return folder


def measured(cmd: list[str], timeout: float = 3600) -> dict:
    """Run ``cmd`` in a fresh wrapper process: its wall seconds, CPU seconds (user + system,
    every descendant) and the peak RSS of its largest process (MiB), and its output. Both
    inherit this process's environment and working directory, so they import the code this
    one does (an editable install, PYTHONPATH, or ``-m`` from the repository root)."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print(json.dumps({'rc': p.returncode, 'wall': time.perf_counter() - t, 'cpu': u.ru_utime + "
               "u.ru_stime, 'peak_mib': u.ru_maxrss / 1024, 'out': p.stdout[-4000:], 'err': p.stderr[-4000:]}))\n")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=timeout)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result['rc']}): {result['err'][-1500:]}")
    return result


CLI = [sys.executable, "-m", "trainer.cli"]

RESUME = """
import json, sys, time
from dataio.augment import build_augmenter
from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest
from dataio.backends.torch_pipeline import WaveBatches
manifest = load_manifest(sys.argv[1])
cfg = DataConfig(shards=sys.argv[1], batch_size=64, num_workers=0, view_seconds=1.0)
aug = build_augmenter({}, FrontendConfig(), 1.0, num_views=2, pairs_per_clip=1, seed=0)
steps = steps_per_epoch(cfg, manifest, 1)
times = {"first": [], "last": []}
for _ in range(5):  # alternating, medians: the machine's noise is larger than the difference
    for name, step in (("first", 0), ("last", steps - 1)):
        t = time.perf_counter()
        next(iter(WaveBatches(cfg, manifest, aug, Placement(steps=steps), epoch=0, start_step=step, in_workers=False)))
        times[name].append(time.perf_counter() - t)
print(json.dumps({name: sorted(v)[len(v) // 2] for name, v in times.items()}))
"""

STARTUP = """
import json, time, psutil, torch
t = time.perf_counter()
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import Pretrainer
import sys
cfg = load_config(PretrainConfig, sys.argv[1], sys.argv[2:])
trainer = Pretrainer(cfg)
built = time.perf_counter() - t
since_launch = time.time() - psutil.Process().create_time()  # the rank's interpreter and torch import too
import resource
if trainer.info.rank == 0:
    print(json.dumps({"startup": built, "since_launch": since_launch,
                      "rank0_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
trainer.close()
"""


def npid(clips: int, work: Path) -> dict:
    """NPID on 2 gloo ranks over ``clips`` synthetic clips: start-up (the trainer built, bank
    slices drawn) and the peak per process of 3 steps and their checkpoint."""
    overrides = ["data.shards=", "data.backend=synthetic", f"data.synthetic_clips={clips}", "model.width=8",
                 "data.batch_size=16", "train.max_steps=3", "train.progress=false", "train.tensorboard=false"]
    recipe = shipped_recipe("demo_npid.yaml")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1"]
    start = measured([*launch, "--master-port=29611", "--no-python", sys.executable, "-c", STARTUP, recipe,
                      *overrides, f"run_dir={work}/npid_s{clips}"])
    run = measured([*launch, "--master-port=29612", "-m", "trainer.cli.pretrain", "--config", recipe, *overrides,
                    f"run_dir={work}/npid{clips}"])
    folder = work / f"npid{clips}" / "checkpoints" / "step_00000003"
    saved = {p.name: p.stat().st_size for p in sorted(folder.glob("*.pt"))}
    shutil.rmtree(work / f"npid{clips}", ignore_errors=True)
    shutil.rmtree(work / f"npid_s{clips}", ignore_errors=True)
    started = json.loads(start["out"].strip().splitlines()[-1])
    return {"clips": clips, "startup_s": started["startup"], "since_launch_s": started["since_launch"],
            "peak_mib_per_process": run["peak_mib"], "saved_bytes": saved}


def resume_run(n: int, work: Path, repeats: int = 3) -> dict:
    """A whole resumed ``pretrain`` (launch, start-up, the seek, one step, its checkpoint,
    exit) at the first and at the last step of an epoch of ``n`` clips; the checkpoints to
    resume from are trained first (not timed), each timed resume starts from a copy of its
    run. Medians over ``repeats``, the two places alternating."""
    from dataio.backends.batch import DataConfig, steps_per_epoch
    from dataio.reading.manifest import load_manifest

    root = work / f"resume{n}"
    shutil.rmtree(root, ignore_errors=True)
    corpus = make_corpus(root / "flac", n)
    steps = steps_per_epoch(DataConfig(shards=str(corpus), batch_size=64), load_manifest(str(corpus)), 1)
    recipe = ["--config", shipped_recipe("demo.yaml"), f"data.shards={corpus}", "model.width=8",
              "train.progress=false", "train.tensorboard=false", "train.ckpt_every=100000", "train.keep_last=1"]
    walls: dict[str, list[float]] = {"first": [], "last": []}
    places = {"first": 1, "last": steps - 1}
    for name, at in places.items():
        measured([*CLI, "pretrain", *recipe, f"run_dir={root}/{name}", f"train.max_steps={at}"], timeout=7200)
    for k in range(repeats):
        for name, at in places.items():
            copy = root / f"{name}{k}"
            shutil.copytree(root / name, copy)
            walls[name].append(measured([*CLI, "pretrain", *recipe, f"run_dir={copy}",
                                         f"train.max_steps={at + 1}"])["wall"])
            shutil.rmtree(copy)
    shutil.rmtree(root, ignore_errors=True)
    median = {name: sorted(v)[len(v) // 2] for name, v in walls.items()}
    return {"clips": n, "steps_per_epoch": steps, "walls_s": walls, "first_s": median["first"],
            "last_s": median["last"], "ratio": median["last"] / median["first"]}


def one_size(n: int, work: Path, shard_max: int) -> dict:
    root = work / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    corpus = make_corpus(root / "flac", n)
    row: dict = {"clips": n, "made_in_s": time.perf_counter() - t}
    check = measured([*CLI, "check-shards", str(corpus), "--workers", "2"])
    convert = measured([*CLI, "shard", "convert", str(corpus), "--format", "pcm16", "--out", str(root / "pcm"),
                        "--workers", "2"])
    bench = measured([*CLI, "bench", "data", "--shards", str(corpus), "--backends", "torch", "--seconds", "5",
                      "--cores", "2"])
    resume = measured([sys.executable, "-c", RESUME, str(corpus)])
    row.update(check_shards={"cpu_us_per_clip": 1e6 * check["cpu"] / n, "peak_mib": check["peak_mib"]},
               convert_pcm16={"cpu_us_per_clip": 1e6 * convert["cpu"] / n, "peak_mib": convert["peak_mib"]},
               bench_data={"wall_s": bench["wall"], "peak_mib": bench["peak_mib"]},
               resume_first_batch_s=json.loads(resume["out"].strip().splitlines()[-1]) | {
                   "peak_mib": resume["peak_mib"]})
    if n <= shard_max:
        make_wav_folder(root / "wav", n)
        shard = measured([*CLI, "shard", str(root / "wav"), "--out", str(root / "sharded"), "--workers", "2"])
        row["shard"] = {"cpu_us_per_clip": 1e6 * shard["cpu"] / n, "wall_us_per_clip": 1e6 * shard["wall"] / n,
                        "peak_mib": shard["peak_mib"]}
    shutil.rmtree(root, ignore_errors=True)
    return row


def print_rows(rows: list[dict], npids: list[dict], resumes: list[dict] = ()) -> None:
    print(f"{'clips':>8} {'check us/clip':>14} {'convert us/clip':>16} {'shard us/clip':>14} "
          f"{'bench data s':>13} {'resume first s':>15} {'resume last s':>14} {'peak MiB (max)':>15}")
    for r in rows:
        peaks = [v["peak_mib"] for v in r.values() if isinstance(v, dict) and "peak_mib" in v]
        shard = r.get("shard", {}).get("cpu_us_per_clip")
        print(f"{r['clips']:>8} {r['check_shards']['cpu_us_per_clip']:>14.0f} "
              f"{r['convert_pcm16']['cpu_us_per_clip']:>16.0f} {'-' if shard is None else f'{shard:.0f}':>14} "
              f"{r['bench_data']['wall_s']:>13.1f} {r['resume_first_batch_s']['first']:>15.3f} "
              f"{r['resume_first_batch_s']['last']:>14.3f} {max(peaks):>15.0f}")
    for n in npids:
        per_rank = max(n["saved_bytes"].values()) / 2**20 if n["saved_bytes"] else 0
        print(f"NPID, {n['clips']} clips, 2 ranks: start-up {n['startup_s']:.1f} s (trainer built; "
              f"{n['since_launch_s']:.1f} s from the rank's launch), peak {n['peak_mib_per_process']:.0f}"
              f" MiB per process, {per_rank:.0f} MiB saved per rank")
    for r in resumes:
        print(f"a whole resumed run, {r['clips']} clips ({r['steps_per_epoch']} steps per epoch): at the first step "
              f"{r['first_s']:.1f} s, at the last {r['last_s']:.1f} s, x{r['ratio']:.2f} (median of "
              f"{len(r['walls_s']['first'])})")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"growth {a['clips']} -> {b['clips']} clips: check-shards per clip x"
              f"{b['check_shards']['cpu_us_per_clip'] / a['check_shards']['cpu_us_per_clip']:.2f}, convert per clip x"
              f"{b['convert_pcm16']['cpu_us_per_clip'] / a['convert_pcm16']['cpu_us_per_clip']:.2f}, bench data wall x"
              f"{b['bench_data']['wall_s'] / a['bench_data']['wall_s']:.2f}, resume at the last step / at the first x"
              f"{b['resume_first_batch_s']['last'] / b['resume_first_batch_s']['first']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="corpus sizes, clips")
    p.add_argument("--shard-max", type=cli_number(int, 0), default=10000,
                   help="time `shard` from WAV files up to this many clips")
    p.add_argument("--npid-clips", default="10000,2000000", help="NPID bank sizes to measure ('' = none)")
    p.add_argument("--resume-run", default="", help="corpus sizes at which to time a whole resumed run ('' = none)")
    p.add_argument("--work", default="/tmp/audioclr-scale", help="scratch folder (emptied per size)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [one_size(int(n), work, args.shard_max) for n in args.sizes.split(",") if n]
    npids = [npid(int(n), work) for n in args.npid_clips.split(",") if n]
    resumes = [resume_run(int(n), work) for n in args.resume_run.split(",") if n]
    print_rows(rows, npids, resumes)
    if args.out:
        Path(args.out).write_text(json.dumps({"sizes": rows, "npid": npids, "resume_run": resumes,
                                              "cpu_cores": os.cpu_count(),
                                              "resource_limit": resource.getrlimit(resource.RLIMIT_AS)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
