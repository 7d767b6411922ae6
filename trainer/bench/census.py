"""Counting the model state of one rank for ``audioclr bench memory``: every distinct tensor
storage alive on a device, and which of them the parameters, gradients, communication
buckets, optimizer state and master copies of an engine hold (:mod:`trainer.bench.memory`'s
docstring gives the categories and the order they are claimed in).
"""

from __future__ import annotations

import gc
import warnings

import torch
from torch import nn

CATEGORIES = ("params", "grads", "buckets", "optim", "master", "other")


def _storage(t) -> tuple[int, int, str] | None:
    """(address, bytes, device) of the storage under tensor ``t``; None when it has none."""
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes(), str(s.device)) if s.nbytes() and s.data_ptr() else None
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, meta, fake tensors
        return None


def tensors_under(obj, path: str = "", depth: int = 8, seen: set | None = None):
    """(path, tensor) for every tensor reachable from ``obj`` through containers and the
    attributes of torch / DeepSpeed objects (modules excluded: their parameters are
    counted as parameters); a tensor's ``.grad`` comes as ``path.grad``."""
    seen = set() if seen is None else seen
    if depth < 0 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.is_leaf and obj.grad is not None:
            yield f"{path}.grad", obj.grad
        return
    if isinstance(obj, nn.Module | str | bytes | int | float | bool | type(None)):
        return
    if isinstance(obj, dict):
        children = ((f"{path}[{k if isinstance(k, str | int) else '.'}]", v) for k, v in list(obj.items()))
    elif isinstance(obj, list | tuple | set | frozenset):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(list(obj)))
    elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch") and hasattr(obj, "__dict__"):
        children = ((f"{path}.{k}", v) for k, v in list(vars(obj).items()))
    else:
        return
    for child_path, child in children:
        yield from tensors_under(child, child_path, depth - 1, seen)


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a dead weak proxy
        return False


def alive_storages(device) -> dict[int, int]:
    """address -> bytes of every distinct storage on ``device`` held by a tensor gc sees."""
    found = {}
    with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if _is_tensor(obj)]
    for obj in tensors:
        s = _storage(obj)
        if s and s[2] == str(device):
            found[s[0]] = s[1]
    return found


def _is_bucket(path: str) -> bool:
    """A ZeRO optimizer's gradient staging buffers: ``ipg_buckets``, ``__ipg_bucket_flat_buffer``."""
    return "ipg" in path.lower() or "bucket" in path.lower()


def attribute(engine, hook_buffers: list, device) -> dict[str, dict[int, int]]:
    """The storages of the model state, by category (params ... master), address -> bytes."""
    zero = getattr(getattr(engine, "ds", None), "optimizer", None)
    client = zero.optimizer if zero is not None else engine.optimizer
    params = list(engine.module.parameters())
    found: list[tuple[str, object]] = []
    found += [("params", p) for p in params] + [("params", p.ds_tensor) for p in params if hasattr(p, "ds_tensor")]
    found += [("buckets", b) for b in hook_buffers]
    if zero is not None:  # before .grad: under ZeRO-2/3 a parameter's .grad is a view into the bucket
        found += [("buckets", t) for path, t in tensors_under(zero, "zero") if _is_bucket(path)]
    found += [("grads", p.grad) for p in params if p.grad is not None]
    found += [("optim", t) for _, t in tensors_under(client.state)]
    # what the client optimizer steps: its groups' tensors, and the keys of its state (ZeRO-3
    # puts its fp32 partitions into the groups only for the length of the step)
    stepped = [t for _, t in tensors_under(client.param_groups)] + [k for k in client.state if _is_tensor(k)]
    found += [("master", t) for t in stepped]
    if zero is not None:
        found += [("grads" if "grad" in path.lower() else "other", t) for path, t in tensors_under(zero, "zero")]
    owner: dict[str, dict[int, int]] = {c: {} for c in CATEGORIES}
    claimed = set()
    for category, t in found:
        s = _storage(t)
        if s and s[2] == str(device) and s[0] not in claimed:
            claimed.add(s[0])
            owner[category][s[0]] = s[1]
    return owner


def snapshot(engine, hook_buffers: list, device) -> dict[str, int]:
    """Bytes per category, and ``total`` over every storage alive on ``device``."""
    gc.collect()
    owner = attribute(engine, hook_buffers, device)
    alive = alive_storages(device)
    for category in CATEGORIES:
        alive.update(owner[category])
    claimed = {ptr for c in CATEGORIES[:-1] for ptr in owner[c]}
    sizes = {c: sum(owner[c].values()) for c in CATEGORIES[:-1]}
    sizes["other"] = sum(n for ptr, n in alive.items() if ptr not in claimed)
    sizes["total"] = sum(alive.values())
    return sizes
