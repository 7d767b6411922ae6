"""Per-rank memory of the model state (parameters, gradients, optimizer state) under
DDP and DeepSpeed ZeRO-1/2/3, measured.

    audioclr bench memory --encoders resnet50,efficientnet_b0 --stages ddp,1,2,3 \\
        --world 2 --batch 8 --out bench_memory.json

Each (encoder, engine) runs in ``--world`` fresh processes (gloo on CPU; NCCL where every
rank has a GPU), each with a timeout; a configuration that fails or hangs becomes a row
saying why. A rank builds the model as ``trainer.train.loop`` does (SimCLR head, global BN,
SGD with momentum, warm-up/cosine schedule, ``build_engine``), takes one step (momentum
and buckets come into being), then a second, counting every distinct tensor storage alive
in the process (each tensor ``gc`` sees and each held by the optimizers, deduplicated by
storage) three times: when autograd has computed every gradient (activations freed, before
the engine's end-of-backward reduction), before ``optimizer.step()``, after it. Storages
are attributed, first match wins:

- params: the module's parameters (under ZeRO-3 each one's partition ``ds_tensor``, and
  the parameters ZeRO-3 keeps whole: those under ``stage3_param_persistence_threshold``);
- buckets: gradient communication buffers: DDP's reducer buckets (seen by a comm hook doing
  what the default one does: all-reduce, divide) and ZeRO's ``ipg`` buffers, allocated
  whole at ``reduce_bucket_size`` elements (on a CPU, unwritten pages are not resident);
- grads: the parameters' ``.grad`` and what the ZeRO optimizer holds under a name with
  "grad" (its gradient partitions);
- optim: the client optimizer's state (SGD's momentum buffers);
- master: what the client optimizer steps that is not a module parameter: ZeRO's fp32
  master partitions, a copy DeepSpeed keeps even when the weights are fp32;
- other: the rest (BN running statistics, ZeRO's bookkeeping).

Beside them: the growth of the process's peak RSS (CPU) or of
``torch.cuda.max_memory_allocated`` (CUDA) from before the model was built, which holds the
activations too; the fp32 SGD expectation (4 B/param each for parameters, gradients and
momentum, divided by the world size where the stage partitions them); and DeepSpeed's own
estimators (``estimate_zero{2,3}_model_states_mem_needs_all_live``), which assume
mixed-precision Adam, not fp32 SGD.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import pickle
import queue as queue_mod
import resource
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from dataio.schema import cli_number
from trainer.bench.census import CATEGORIES, snapshot
from trainer.models.encoders import build_encoder
from trainer.objectives import ObjectiveContext, build_objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel.deepspeed_engine import import_deepspeed
from trainer.parallel.engines import build_engine
from trainer.parallel.sync_bn import convert_global_bn
from trainer.train.config import DeepSpeedConfig, ModelConfig, ObjectiveConfig, OptimConfig

MIB = 2 ** 20


# ---------------------------------------------------------------- one rank
def build(spec: dict, rank: int, world: int, device):
    """The objective and the engine, built as ``trainer.train.loop.Pretrainer`` builds them."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(encoder=spec["encoder"], width=spec["width"], proj_hidden=spec["proj_hidden"],
                            proj_dim=spec["proj_dim"])
    objective = build_objective(ObjectiveConfig(name="simclr"), model_cfg,
                                ObjectiveContext(rank=rank, world_size=world, device=device, total_steps=10))
    model = convert_global_bn(objective.build_model(build_encoder(spec["encoder"], in_channels=1,
                                                                  width=spec["width"])))
    model.to(device)
    objective.attach(model)
    o = OptimConfig()
    optimizer = build_optimizer("sgd", model, o.lr, o.momentum, o.weight_decay, o.lars_eta)
    scheduler = build_scheduler(optimizer, 2, 10)
    ds = None
    if spec["stage"] != "ddp":
        buckets = {"reduce_bucket_size": spec["bucket"], "allgather_bucket_size": spec["bucket"]}
        ds = DeepSpeedConfig(zero_stage=int(spec["stage"]), config=spec["ds_config"],
                             **(buckets if spec["bucket"] else {}))
    engine = build_engine("ddp" if ds is None else "deepspeed", model, optimizer, scheduler, device, None, 0.0,
                          settings=ds, batch_size=spec["batch"])
    return objective, engine


def watch_ddp_buckets(engine) -> list:
    """The DDP reducer's bucket buffers of the latest backward, seen by a comm hook doing
    what the built-in one does (all-reduce the bucket, divide by the world size)."""
    seen: list = []
    if isinstance(getattr(engine, "model", None), DistributedDataParallel):
        def hook(state, bucket):
            seen.append(bucket.buffer())
            return allreduce_hook(state, bucket)
        engine.model.register_comm_hook(None, hook)
    return seen


def forward_backward(engine, objective, spec: dict, device, probe=None) -> None:
    """One forward and backward on random views [batch, 2, 1, mels, frames]; ``probe()``
    runs once autograd has computed every gradient, before the engine's own end-of-backward
    work (DDP's last bucket wait, ZeRO's final reduction into partitions)."""
    views = torch.randn(spec["batch"], 2, 1, spec["mels"], spec["frames"], device=device)
    batch = SimpleNamespace(views=views, labels=None, indices=torch.arange(spec["batch"], device=device))
    engine.train()
    out = engine.forward(objective.model_views(views))
    loss = objective.loss(out, batch)
    del out, views, batch
    if probe is not None:  # the loss's gradient comes first, so this callback is queued first
        loss.register_hook(lambda grad: torch.autograd.Variable._execution_engine.queue_callback(probe))
    engine.backward(loss)


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(spec: dict, rank: int, world: int, device) -> dict:
    """One rank: build, one step, then count at the end of the second step's backward,
    once the engine has finished its backward, and after the step."""
    if spec["stage"] != "ddp":
        import_deepspeed(device)  # before the baseline: the import is not model state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = peak_bytes(device)
    objective, engine = build(spec, rank, world, device)
    hook_buffers = watch_ddp_buckets(engine)
    forward_backward(engine, objective, spec, device)
    engine.step()
    hook_buffers.clear()  # DDP rebuilds its buckets after the first step
    found = {}
    forward_backward(engine, objective, spec, device,
                     probe=lambda: found.setdefault("backward_end", snapshot(engine, hook_buffers, device)))
    found["at_step"] = snapshot(engine, hook_buffers, device)
    engine.step()
    found["after_step"] = snapshot(engine, hook_buffers, device)
    return {"rank": rank, **found, "peak_delta": peak_bytes(device) - base,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "max RSS",
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())}


def _entry(rank: int, world: int, port: int, spec: dict, timeout_s: float, results) -> None:
    """A spawned rank: its process group, then ``measure``; reports to the parent."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if spec["device"] == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        results.put((rank, pickle.dumps(measure(spec, rank, world, device)), None))
    except Exception as err:  # report to the parent instead of hanging it
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        results.put((rank, None, (reason, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(spec: dict, world: int, timeout_s: float) -> dict:
    """``measure`` on ``world`` spawned ranks: {"ranks": [...]} or {"failed": reason}."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, spec, timeout_s, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    ranks, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(ranks) < world:
            try:
                rank, value, error = results.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in ranks]
                if dead:
                    return {"failed": f"rank {dead[0][0]} died (exit code {dead[0][1]})"}
                if time.monotonic() > deadline:
                    return {"failed": f"timed out after {timeout_s:.0f} s"}
                continue
            if error:
                return {"failed": f"rank {rank}: {error[0]}", "traceback": error[1]}
            ranks[rank] = pickle.loads(value)
        return {"ranks": [ranks[r] for r in range(world)]}
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


# ---------------------------------------------------------------- expectations
def expectations(encoder: str, spec: dict, world: int, stages: list[str]) -> dict:
    """Per stage: the fp32 SGD expectation and DeepSpeed's estimate (bytes per rank), with
    the text DeepSpeed's ``*_all_live`` estimator prints for this model."""
    objective = build_objective(ObjectiveConfig(name="simclr"), ModelConfig(
        encoder=encoder, width=spec["width"], proj_hidden=spec["proj_hidden"], proj_dim=spec["proj_dim"]),
        ObjectiveContext())
    model = objective.build_model(build_encoder(encoder, in_channels=1, width=spec["width"]))
    n = sum(p.numel() for p in model.parameters())
    split = {"ddp": (1, 1, 1), "1": (1, 1, world), "2": (1, world, world), "3": (world, world, world)}
    out = {"params": n}
    for stage in stages:
        out[stage] = {"sgd_fp32": int(sum(4 * n / s for s in split[stage]))}
        out[stage].update(deepspeed_estimate(model, stage, world) if stage != "ddp" else {"deepspeed": None})
    return out


def deepspeed_estimate(model, stage: str, world: int) -> dict:
    """DeepSpeed's per-GPU estimate without offload (mixed-precision Adam), and what its
    ``_all_live`` estimator prints. There is no ZeRO-1 estimator: ZeRO-2's stands in."""
    try:
        if stage == "3":
            from deepspeed.runtime.zero import stage3 as z  # deferred: DeepSpeed is heavy and optional
        else:
            from deepspeed.runtime.zero import stage_1_and_2 as z  # deferred: as above
        text = io.StringIO()
        live = getattr(z, f"estimate_zero{3 if stage == '3' else 2}_model_states_mem_needs_all_live")
        with contextlib.redirect_stdout(text):
            live(model, num_gpus_per_node=world, num_nodes=1)
        if stage == "3":
            total, largest = z.model_to_params(model)
            _, gpu, _ = z.estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world,
                                                                cpu_offload=False, cpu_offload_params=False)
        else:
            _, gpu = z.estimate_zero2_model_states_mem_needs(z.model_to_params(model), num_gpus_per_node=world,
                                                             cpu_offload=False)
        return {"deepspeed": int(gpu), "deepspeed_text": text.getvalue()}
    except Exception as err:  # the estimate is a comparison, not the measurement
        return {"deepspeed": None, "deepspeed_text": f"unavailable: {type(err).__name__}: {err}"}


# ---------------------------------------------------------------- report
def summarise(result: dict) -> dict:
    """The rank holding the most at the end of backward (ranks differ by ZeRO's padding):
    its split there, and its totals once the engine's backward is done and after the step."""
    top = max(result["ranks"], key=lambda r: r["backward_end"]["total"])
    return {**top["backward_end"], "rank": top["rank"], "at_step": top["at_step"]["total"],
            "after_step": top["after_step"]["total"], "peak_delta": top["peak_delta"]}


def print_table(rows: list[dict], world: int, peak_kind: str) -> None:
    def mib(v):
        return "-" if v is None else f"{v / MIB:.{1 if abs(v) >= 10 * MIB else 2}f}"
    cols = ["encoder", "engine", "params M", "total MiB", *(f"{c} MiB" for c in CATEGORIES), "at step MiB",
            "after step MiB", f"{peak_kind} Δ MiB", "fp32 SGD expect MiB", "DeepSpeed est. MiB (Adam mp)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        head = [row["encoder"], row["engine"], f"{row['params'] / 1e6:.2f}"]
        tail = [mib(row["sgd_fp32"]), mib(row["deepspeed"])]
        if "failed" in row:
            print("| " + " | ".join(head + [f"FAILED: {row['failed']}"] + [""] * (len(cols) - 6) + tail) + " |")
            continue
        s = row["measured"]
        measured = [s["total"], *(s[c] for c in CATEGORIES), s["at_step"], s["after_step"], s["peak_delta"]]
        print("| " + " | ".join(head + [mib(v) for v in measured] + tail) + " |")
    print(f"""
Per rank (world {world}; the rank holding the most), bytes of distinct tensor storages alive:
- total and its split: once autograd has computed every gradient of the second step, before the
  engine's end-of-backward work (ZeRO-1 still holds whole gradients here, ZeRO's gradient
  bucket is still allocated); at step: after the engine's backward, before optimizer.step();
  after step: once the step has run (DDP and ZeRO-1/2 have dropped their gradients).
- buckets are allocated with torch.empty at their configured size (reduce_bucket_size);
  on a CPU their untouched pages take no resident memory: compare the {peak_kind} column.
- {peak_kind} Δ: growth of the process's peak from before the model was built; it holds
  the activations and the allocator's slack as well.
- fp32 SGD expect: 4 B/param each for params, grads and momentum, divided by {world} where
  the stage partitions them (ZeRO-1: momentum; 2: and grads; 3: and params).
- DeepSpeed est.: its estimate_zero2_model_states_mem_needs (ZeRO-1 and 2; there is no
  ZeRO-1 estimator) / estimate_zero3_model_states_mem_needs (ZeRO-3, zero_init) per GPU,
  without offload. They ASSUME MIXED-PRECISION ADAM (2 B fp16 params + 16 B/param of fp16
  grads, fp32 grads, params, momentum and variance split by ZeRO), not this fp32 SGD.""")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="audioclr bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="resnet50,efficientnet_b0")
    p.add_argument("--stages", default="ddp,1,2,3", help="ddp and/or ZeRO stages 1,2,3")
    p.add_argument("--world", type=cli_number(int, 1), default=2, help="processes (ranks)")
    p.add_argument("--batch", type=cli_number(int, 1), default=8, help="clips per rank (two views each)")
    p.add_argument("--mels", type=cli_number(int, 1), default=64)
    p.add_argument("--frames", type=cli_number(int, 1), default=96)
    p.add_argument("--width", type=cli_number(int, 1), default=64, help="model.width")
    p.add_argument("--proj-hidden", type=cli_number(int, 1), default=512)
    p.add_argument("--proj-dim", type=cli_number(int, 1), default=128)
    p.add_argument("--bucket", type=cli_number(int, 0), default=0,
                   help="deepspeed reduce/allgather bucket size in elements (0: the trainer's default)")
    p.add_argument("--ds-config", default="{}", help="JSON merged into deepspeed.config (e.g. "
                   "'{\"zero_optimization\": {\"stage3_param_persistence_threshold\": 0}}')")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when there is a GPU per rank")
    p.add_argument("--timeout", type=cli_number(float, 0, above=True), default=900.0,
                   help="seconds per configuration")
    p.add_argument("--out", default="bench_memory.json")
    args = p.parse_args(argv)
    bad = [s for s in args.stages.split(",") if s not in ("ddp", "1", "2", "3")]
    if bad:
        p.error(f"--stages: {', '.join(bad)} not one of ddp, 1, 2, 3")
    try:
        args.ds_config = json.loads(args.ds_config)
    except json.JSONDecodeError as err:
        p.error(f"--ds-config: not JSON ({err})")
    return args


def _leave(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_config, which ends its ranks


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _leave)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.device_count() >= args.world else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stages = args.stages.split(",")
    spec = {"batch": args.batch, "mels": args.mels, "frames": args.frames, "width": args.width,
            "proj_hidden": args.proj_hidden, "proj_dim": args.proj_dim, "bucket": args.bucket,
            "ds_config": args.ds_config, "device": device}
    rows = []
    for encoder in args.encoders.split(","):
        try:
            expect, refused = expectations(encoder, spec, args.world, stages), None
        except Exception as err:  # an unknown encoder, a size it refuses: a row, not a crash
            refused = {"failed": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
            expect = {"params": 0, **{s: {"sgd_fp32": None, "deepspeed": None} for s in stages}}
        for stage in stages:
            name = "ddp" if stage == "ddp" else f"zero{stage}"
            print(f"[bench memory] {encoder} {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            result = refused or run_config({**spec, "encoder": encoder, "stage": stage}, args.world, args.timeout)
            row = {"encoder": encoder, "engine": name, "params": expect["params"], **expect[stage],
                   "seconds": round(time.perf_counter() - started, 1), **result}
            if "ranks" in result:
                row["measured"] = summarise(result)
            rows.append(row)
    print_table(rows, args.world, "CUDA peak" if device == "cuda" else "RSS")
    report = {"command": " ".join(["audioclr", "bench", "memory", *(argv if argv is not None else sys.argv[1:])]),
              "world": args.world, "device": device, "settings": spec, "categories": CATEGORIES, "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {args.out}")
    return 1 if any("failed" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
