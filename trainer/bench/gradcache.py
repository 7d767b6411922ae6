"""Peak memory of one SimCLR step: plain batches vs. gradient caching.

    audioclr bench gradcache [--batches 256,1024] [--cached 8192] [--chunk 256] [--width 16]

Each configuration runs in its own process; the peak is the process's maximum resident
set (CPU) or torch.cuda.max_memory_allocated (GPU). Gradient caching should hold the
memory of one chunk plus the cached embeddings, whatever the batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import torch

from dataio.frontend import FrontendConfig, LogMel
from dataio.schema import cli_number
from trainer.models.encoders import build_encoder
from trainer.objectives import ObjectiveContext, build_objective
from trainer.parallel.gradcache import GradCache
from trainer.train.config import ModelConfig, ObjectiveConfig


def one_step(batch: int, chunk: int, width: int, seconds: float) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    obj = build_objective(ObjectiveConfig(name="simclr"), ModelConfig(), ObjectiveContext(device=device))
    enc = build_encoder("resnet18", width=width)
    model = obj.build_model(enc).to(device)
    frames = LogMel(FrontendConfig())(torch.zeros(1, int(16000 * seconds))).shape[-1]
    views = torch.randn(batch, 2, 1, 64, frames, device=device)
    start = time.perf_counter()
    if chunk:
        cache = GradCache(model, views, chunk, contextlib.nullcontext)  # as the trainer does it
        obj.loss_backward(cache.outputs(), None, chunk)
        cache.backward()
    else:
        obj.loss(model(views), None).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"batch": batch, "chunk": chunk, "peak_mb": round(peak), "seconds": round(time.perf_counter() - start, 1),
            "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr bench gradcache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="256,1024", help="plain batch sizes to compare with")
    p.add_argument("--cached", type=cli_number(int, 1), default=8192, help="batch run with gradient caching")
    p.add_argument("--chunk", type=cli_number(int, 1), default=256)
    p.add_argument("--width", type=cli_number(int, 1), default=16)
    p.add_argument("--seconds", type=cli_number(float, 0, above=True), default=0.5, help="view length")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        batch, chunk = map(int, args.one.split(","))
        print(json.dumps(one_step(batch, chunk, args.width, args.seconds)))
        return 0
    runs = [(b, 0) for b in map(int, args.batches.split(","))] + [(args.cached, args.chunk)]
    print(f"{'batch':>7}{'chunk':>7}{'peak MiB':>10}{'seconds':>9}")
    for batch, chunk in runs:
        # a fresh process per configuration: its peak is that configuration's alone
        out = subprocess.run([sys.executable, "-m", "trainer.bench.gradcache", "--one", f"{batch},{chunk}",
                              "--width", str(args.width), "--seconds", str(args.seconds)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['batch']:>7}{r['chunk'] or '-':>7}{r['peak_mb']:>10}{r['seconds']:>9}  ({r['device']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
