#!/usr/bin/env python3
"""Everything a short GPU session should run, as one command that never hangs.

    tools/gpu_check.sh OUT_DIR [--quick] [--budget 480]

Stages, each in its own process group under a time limit (a stage that overruns is
killed and reported, the rest go on): the machine; the CUDA-marked tests; DALI's GPU
log-mel against torchaudio's; a demo corpus as shards; ``audioclr bench data`` (with
every clip format: bytes per second of audio, clips/s per loader core);
``audioclr bench train`` for the demo recipe on ResNet-18 at full width, 256 clips, bf16
and channels-last, on synthetic batches and on real ones from every clip format through
both back ends (at most 8 CPU cores for data), ResNet-50 in bf16, and ResNet-18 with
``torch.compile`` (what ``train.compile: auto`` buys); a
2-step ``torchrun`` NCCL run where there are two GPUs. A stage that cannot run here (no
GPU, no DALI, one GPU) is reported as skipped with the reason. Everything lands in
``OUT_DIR/gpu_check.json`` (each stage: status, seconds, its JSON result, its output's
tail) and a short ``OUT_DIR/report.txt``. ``--quick``: tiny sizes, for a CPU smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

DALI_VS_TORCH = """
import json, sys, numpy as np, torch
from dataio.backends.dali_pipeline import numpy_logmel
from dataio.frontend import FrontendConfig, LogMel
cfg = FrontendConfig()
g = np.random.default_rng(0)
waves = (0.1 * g.standard_normal((64, cfg.sample_rate))).astype(np.float32)
ours = LogMel(cfg).cuda()(torch.from_numpy(waves).cuda())[:, 0].cpu().numpy()
dali = numpy_logmel(waves, cfg, device="gpu")
worst = float(np.abs(ours - dali).max() * cfg.norm_std)
json.dump({"max_abs_db": worst, "ok": worst < 0.01}, open(sys.argv[1], "w"))
print(f"max |torchaudio(cuda) - DALI(gpu)| = {worst:.2e} dB")
sys.exit(0 if worst < 0.01 else 1)
"""


def facts() -> dict:
    gpus = torch.cuda.device_count()
    return {"gpus": gpus, "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "dali": importlib.util.find_spec("nvidia.dali") is not None,
            "deepspeed": importlib.util.find_spec("deepspeed") is not None, "cores": os.cpu_count()}


def run_stage(name: str, cmd: list[str], limit: float, out: Path, result: Path | None = None) -> dict:
    """``cmd`` in its own session under ``limit`` seconds; its status and output tail."""
    log = out / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout after {limit:.0f} s"
    record = {"status": status, "seconds": round(time.perf_counter() - start, 1),
              "command": " ".join(cmd), "tail": log.read_text(errors="replace")[-2500:]}
    if result is not None and result.is_file():
        try:
            record["result"] = json.loads(result.read_text())
        except ValueError:
            pass
    return record


def plan(out: Path, quick: bool, f: dict) -> list[tuple]:
    """(name, why it is skipped or None, command, time limit, result file)."""
    gpu = f["gpus"] > 0
    no_gpu = None if gpu else "no CUDA device"
    work = out / "work"
    shards = work / "shards"
    small = quick or not gpu
    data_cores = 2 if small else min(8, max(2, (f["cores"] or 4) - 2))  # the target: at most 8 cores for data
    train = ["--steps", "3" if small else "30", "--warmup", "1" if small else "5", "--data", str(shards),
             "--precision", "bf16" if gpu else "fast", "--channels-last", "--view-seconds", "0.95",
             "--workers", str(data_cores)]
    backends = "torch,dali" if f["dali"] else "torch"
    formats = ["--formats", "flac,pcm16,logmel", "--config", "configs/demo.yaml"]
    stages = [
        ("cuda_tests", no_gpu, [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 120, None),
        ("dali_gpu_mel_vs_torch", no_gpu or (None if f["dali"] else "DALI is not installed"),
         [PY, "-c", DALI_VS_TORCH, str(out / "dali_gpu_mel.json")], 90, out / "dali_gpu_mel.json"),
        ("corpus", None, [PY, "-m", "trainer.cli", "demo-corpus", "--out", str(shards), "--overwrite",
                          "--clips", "24" if quick else "64" if small else "2000"], 90, None),
        ("bench_data", None, [PY, "-m", "trainer.cli", "bench", "data", "--shards", str(shards), "--backends",
                              backends, "--seconds", "0.5" if quick else "2" if small else "8", *formats,
                              "--out", str(out / "bench_data.json")], 150, out / "bench_data.json"),
        ("bench_train_formats", None, [PY, "-m", "trainer.cli", "bench", "train", "--encoder", "resnet18",
                                       "--width", "8" if small else "64", "--batch", "8" if small else "256",
                                       "--backends", backends, *train, *formats,
                                       "--out", str(out / "bench_formats.json")], 240, out / "bench_formats.json"),
        ("bench_train_resnet50", None if gpu or quick else "ResNet-50 on a CPU would not fit the time",
         [PY, "-m", "trainer.cli", "bench", "train", "--encoder", "resnet50", "--width", "8" if small else "64",
          "--batch", "8" if small else "256", "--backends", backends, *train, "--out", str(out / "bench_r50.json")],
         120, out / "bench_r50.json"),
        ("bench_train_resnet18_compiled", None if gpu else "torch.compile takes minutes on a CPU",
         [PY, "-m", "trainer.cli", "bench", "train", "--encoder", "resnet18", "--width", "64", "--batch", "512",
          "--compile", "on", "--steps", "30", "--warmup", "5", "--precision", "bf16", "--channels-last",
          "--view-seconds", "0.95", "--out", str(out / "bench_r18_compiled.json")],
         180, out / "bench_r18_compiled.json"),
        ("torchrun_nccl_2gpu", None if f["gpus"] >= 2 else f"{f['gpus']} GPU(s): needs 2",
         [PY, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "trainer.cli.pretrain",
          f"data.shards={shards}", f"run_dir={work / 'nccl'}", "train.max_steps=2", "data.batch_size=16",
          "train.progress=false", "model.width=16"], 120, None),
    ]
    return stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for gpu_check.json, report.txt and each stage's log")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, e.g. on a CPU)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages together")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    f = facts()
    report = {"machine": f, "stages": {}}
    for name, skip, cmd, limit, result in plan(out, args.quick, f):
        left = args.budget - (time.perf_counter() - started)
        if skip is None and left < 10:
            skip = "the time budget is spent"
        if skip is not None:
            report["stages"][name] = {"status": f"skipped: {skip}"}
        else:
            report["stages"][name] = run_stage(name, cmd, min(limit, left), out, result)
        print(f"[gpu_check] {name}: {report['stages'][name]['status']}", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "report.txt").write_text(summary(report))
    print(summary(report))
    return 0 if all(s["status"] == "ok" or s["status"].startswith("skipped") for s in report["stages"].values()) \
        else 1


def summary(report: dict) -> str:
    f = report["machine"]
    lines = [f"gpu_check: {f['gpus']} GPU(s) {', '.join(f['gpu_names'])}; torch {f['torch']} (CUDA {f['cuda']}); "
             f"DALI {'yes' if f['dali'] else 'no'}; {f['cores']} cores; {report.get('seconds', '?')} s"]
    for name, stage in report["stages"].items():
        line = f"  {name:<24} {stage['status']}" + (f" ({stage['seconds']} s)" if "seconds" in stage else "")
        res = stage.get("result") or {}
        if "max_abs_db" in res:
            line += f"; max diff {res['max_abs_db']:.2e} dB"
        for row, values in (res.get("rows") or {}).items():
            if "clips_per_second" in values:
                ratio = f" ({values['vs_synthetic']:.2f} x synthetic)" if "vs_synthetic" in values else ""
                line += f"; {row} {values['clips_per_second']:.0f} clips/s{ratio}"
        for fmt, values in ((res.get("formats") or {}).get("rows") or {}).items():
            line += f"; {fmt} {values['loader_clips_per_second_per_core']:.0f} clips/s per loader core"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
