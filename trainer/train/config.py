"""Typed configuration: dataclass schemas, YAML files, dotted command-line overrides.

Every key is a dataclass field declared with :func:`option` (default, one-line doc,
optional choices). ``load_config`` merges defaults <- YAML <- ``a.b=v`` overrides and
checks every key and type before any work starts; a mistake raises
:class:`ConfigError` naming the key (and the nearest valid names), which the command
line turns into exit status 2. A YAML file may name a ``base:`` recipe it is written
over (:func:`read_recipe`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dataio.atomic import write_text_atomically
from dataio.augment import parse_chain
from dataio.backends.batch import DataConfig
from dataio.backends.registry import backend_class
from dataio.frontend import FrontendConfig
from dataio.recipes import overlay, parse_overrides, read_recipe, read_yaml
from dataio.schema import build_section, check, option
from trainer.evaluate.config import OnlineConfig
from trainer.models.encoders import ENCODERS
from trainer.objectives import OBJECTIVES
from trainer.objectives.moco import MOMENTUM_SCHEDULES
from trainer.optim import OPTIMIZERS, SCHEDULES
from trainer.parallel.device import PRECISIONS
from trainer.parallel.engines import ENGINES
from trainer.speed import COMPILE_MODES

log = logging.getLogger(__name__)

# The choices of a key are the names of the registry that holds its implementations.

# ----------------------------------------------------------------------------- merging


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """Defaults of ``cls`` <- ``base`` <- recipe at ``path`` (over its own bases) <- dotted ``overrides``."""
    tree = dict(base or {})
    layers = ([read_recipe(path)] if path is not None else []) + [parse_overrides(overrides or [])]
    for layer in layers:
        tree = overlay(tree, layer)
    cfg = build_section(cls, tree, "")
    if cls is PretrainConfig:
        recipe, own = (layers[0], read_yaml(path)) if path is not None else ({}, {})
        check_objective_keys(cfg.objective.name, [_section(base, "objective") | _section(recipe, "objective"),
                                                  _section(own, "objective"), _section(layers[-1], "objective")])
    return cfg


def _section(tree: dict | None, name: str) -> dict:
    part = (tree or {}).get(name)
    return part if isinstance(part, dict) else {}


def check_objective_keys(name: str, layers: list[dict]) -> None:
    """An ``objective.*`` key the chosen objective does not read (see each objective's
    ``reads``) is refused by name where it was set with or after the choice of objective
    (the same recipe file, or the command line), and a warning where it came from before
    it (a ``base:`` recipe for another objective, or a recipe whose objective the command
    line replaced): it would change nothing. ``layers``: the objective sections set by the
    bases (merged), by the recipe file itself and by the overrides, in that order."""
    reads = set(OBJECTIVES[name].reads) | {"name"}
    chose = max((i for i, layer in enumerate(layers) if "name" in layer), default=-1)
    for key in dict.fromkeys(k for layer in layers for k in layer):
        if key in reads:
            continue
        latest = max(i for i, layer in enumerate(layers) if key in layer)
        why = (f"objective {name} does not read it (it reads "
               f"{', '.join(OBJECTIVES[name].reads) or 'no objective.* key but name'})")
        if latest >= chose:
            check(False, f"objective.{key}", f"{why}: remove it")
        log.warning("objective.%s is set by %s, but %s; it changes nothing", key,
                    "a base recipe" if latest == 0 else "the recipe", why)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); a pretraining config's objective
    section holds the keys its objective reads, so the file loads back as it is."""
    tree = to_dict(cfg)
    if isinstance(cfg, PretrainConfig):
        reads = {"name", *OBJECTIVES[cfg.objective.name].reads}
        tree["objective"] = {k: v for k, v in tree["objective"].items() if k in reads}
    write_text_atomically(path, yaml.safe_dump(tree, sort_keys=False))


# ----------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    encoder: str = option("resnet18", "encoder architecture", tuple(ENCODERS))
    width: int = option(64, "channels of the encoder's first stage (64 = the published sizes)")
    pretrained: str = option("", "local file of torchvision-named weights to start the encoder from "
                             "(e.g. ImageNet; the first conv is adapted to frontend.channels)")
    proj_hidden: int = option(512, "hidden units of the projection head")
    proj_dim: int = option(128, "output size of the projection head")
    global_bn: bool = option(True, "batch-norm statistics over the global batch (all ranks)")

    def __post_init__(self) -> None:
        check(self.width >= 4, "width", "must be >= 4")
        check(self.proj_hidden > 0, "proj_hidden", "must be positive")
        check(self.proj_dim > 0, "proj_dim", "must be positive")


def _read_by(key: str, doc: str) -> str:
    """An objective key's doc, with the objectives that read it (their ``reads``)."""
    return f"{doc} (read by {', '.join(n for n, o in OBJECTIVES.items() if key in o.reads)})"


@dataclass
class ObjectiveConfig:
    name: str = option("simclr", "training objective", tuple(OBJECTIVES))
    temperature: float = option(0.2, _read_by("temperature", "softmax temperature of the contrastive loss"))
    alpha: float = option(0.5, _read_by("alpha", "weight of SupCon in alpha*SupCon + (1-alpha)*CE"))
    overlap_weighting: bool = option(False, _read_by("overlap_weighting", "multi-label: weight positives by "
                                                     "label overlap"))
    supcon_dim: int = option(64, _read_by("supcon_dim", "size of the linear projection"))
    queue_size: int = option(65536, _read_by("queue_size", "negatives in the queue (all ranks together)"))
    momentum: float = option(0.999, _read_by("momentum", "momentum of the key encoder's EMA"))
    momentum_schedule: str = option("constant", _read_by("momentum_schedule", "EMA momentum schedule"),
                                    tuple(MOMENTUM_SCHEDULES))
    nce_noise: int = option(4096, _read_by("nce_noise", "noise rows per positive for NCE; 0 = exact softmax "
                                           "over the bank"))
    bank_momentum: float = option(0.5, _read_by("bank_momentum", "momentum of the memory-bank row updates"))
    cola_dim: int = option(512, _read_by("cola_dim", "size of the Linear+LayerNorm+tanh head"))
    global_negatives: bool = option(True, _read_by("global_negatives", "candidates from all ranks (False: "
                                                   "this rank's batch)"))
    looc_invariant: str = option("all", _read_by("looc_invariant", "positives of the invariant space: all views "
                                                 "of a clip, or views 0 and 1 only (the pair that shares no "
                                                 "augmentation)"), ("all", "pair"))

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", "must be positive")
        check(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        check(self.queue_size > 0, "queue_size", "must be positive")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(0 <= self.bank_momentum < 1, "bank_momentum", "must be in [0, 1)")
        check(self.nce_noise >= 0, "nce_noise", "must be >= 0")


@dataclass
class OptimConfig:
    name: str = option("sgd", "optimizer (adamw: momentum is its beta1)", tuple(OPTIMIZERS))
    lr: float = option(0.1, "peak learning rate (after warm-up)")
    momentum: float = option(0.9, "momentum")
    weight_decay: float = option(1e-4, "weight decay of conv / linear weights (not biases or norms)")
    lars_eta: float = option(0.001, "LARS trust coefficient")
    warmup_steps: int = option(0, "linear warm-up steps")
    warmup_epochs: float = option(0.0, "linear warm-up in epochs (instead of warmup_steps)")
    schedule: str = option("cosine", "after the warm-up: cosine to final_lr_ratio, step (x decay at each "
                           "milestone epoch), exponential (x decay per epoch) or constant", SCHEDULES)
    milestones: list[float] = option([], "step schedule: epochs at which the learning rate is multiplied by decay")
    decay: float = option(0.1, "step: factor per milestone; exponential: factor per epoch")
    final_lr_ratio: float = option(0.0, "learning rate at the end of the cosine, as a fraction of lr")
    grad_clip: float = option(0.0, "clip the global gradient norm to this (0 = off)")
    kernel: str = option("auto", "the optimizer's update: fused (one kernel for all tensors; sgd only), "
                         "default (PyTorch's), auto = fused for sgd on a GPU; on a CPU it saves under 1% of a "
                         "step, so auto keeps the default", ("auto", "fused", "default"))

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(self.warmup_epochs >= 0 and not (self.warmup_epochs and self.warmup_steps), "warmup_epochs",
              "must be >= 0, and not given together with warmup_steps")
        check(0 < self.decay <= 1, "decay", "must be in (0, 1]")
        check(all(m > 0 for m in self.milestones) and self.milestones == sorted(self.milestones), "milestones",
              "must be positive epochs in increasing order")
        check(self.schedule != "step" or bool(self.milestones), "milestones", "the step schedule needs milestones")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(self.kernel != "fused" or self.name == "sgd", "kernel", f"fused is for sgd only, not {self.name}")


@dataclass
class TrainConfig:
    epochs: int = option(10, "epochs to train")
    max_steps: int = option(0, "stop after this many steps in total (0 = epochs x steps per epoch)")
    log_every: int = option(10, "steps between metric records")
    ckpt_every: int = option(500, "steps between checkpoints (a final one is always written)")
    keep_last: int = option(3, "checkpoints kept (older ones are deleted)")
    resume: str = option("auto", "'auto' = newest checkpoint of run_dir, 'none', or a checkpoint folder")
    precision: str = option("auto", "autocast dtype: auto = bf16 on GPU, fp32 on CPU; fast = bf16 wherever the "
                            "hardware computes it natively (a GPU, or a CPU with AVX512-BF16 or AMX), else fp32",
                            tuple(PRECISIONS))
    channels_last: bool = option(False, "keep conv weights and activations channels-last (NHWC): faster "
                                 "convolutions on CPUs with oneDNN and on GPUs with tensor cores")
    compile: str = option("auto", "torch.compile the encoder: on, off, or auto = on a GPU, falling back to "
                          "eager with a warning if compilation fails (tried before the first step)", COMPILE_MODES)
    cudnn_benchmark: bool = option(True, "GPU: let cuDNN time its convolution algorithms once per batch shape "
                                   "and keep the fastest (training batches all have one shape)")
    device: str = option("auto", "auto = cuda when available", ("auto", "cpu", "cuda"))
    threads: int = option(0, "CPU threads of the training process; 0 = auto: the cores idle at start (a core "
                          "another process keeps busy would stall every step), or OMP_NUM_THREADS when set")
    engine: str = option("ddp", "how the model is replicated across ranks: ddp (PyTorch DDP) or deepspeed "
                         "(ZeRO, set in the deepspeed section)", tuple(ENGINES))
    progress: bool = option(True, "progress bar on rank 0")
    tensorboard: bool = option(True, "write TensorBoard events to run_dir/tb")
    grad_cache_chunk: int = option(0, "gradient caching: clips per forward chunk (0 = off); "
                                   "the batch's memory becomes one chunk's")

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.max_steps >= 0, "max_steps", "must be >= 0")
        check(self.log_every > 0, "log_every", "must be positive")
        check(self.ckpt_every > 0, "ckpt_every", "must be positive")
        check(self.keep_last > 0, "keep_last", "must be positive")
        check(self.grad_cache_chunk >= 0, "grad_cache_chunk", "must be >= 0")
        check(self.threads >= 0, "threads", "must be >= 0 (0 = auto)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = option(1, "ZeRO stage: 0 = data parallel; 1 = optimizer state split across ranks; "
                             "2 = and gradients; 3 = and parameters", (0, 1, 2, 3))
    precision: str = option("fp32", "weights and gradients: fp32 (train.precision may add autocast), or bf16 / "
                            "fp16 weights with fp32 master weights (fp16: dynamic loss scaling, a GPU)",
                            ("fp32", "bf16", "fp16"))
    offload_optimizer: bool = option(False, "keep the optimizer state and its step in host memory (ZeRO >= 1)")
    offload_params: bool = option(False, "keep the parameters in host memory between uses (ZeRO-3)")
    reduce_bucket_size: int = option(0, "elements per gradient reduction bucket; 0 = the model's parameter "
                                     "count, at most 5e8 (DeepSpeed allocates the whole bucket on every rank)")
    allgather_bucket_size: int = option(0, "elements per parameter all-gather bucket (ZeRO-1/2); 0 = as "
                                        "reduce_bucket_size")
    overlap_comm: bool = option(False, "overlap gradient reduction with the backward pass")
    config: dict[str, Any] = option({}, "any other DeepSpeed config key, merged as is (e.g. {zero_optimization: "
                                    "{contiguous_gradients: true}}); batch sizes, optimizer, scheduler, clipping "
                                    "and the keys above stay audioclr's")

    def __post_init__(self) -> None:
        check(self.reduce_bucket_size >= 0, "reduce_bucket_size", "must be >= 0 (0 = auto)")
        check(self.allgather_bucket_size >= 0, "allgather_bucket_size", "must be >= 0 (0 = auto)")
        check(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
              "needs zero_stage >= 1 (stage 0 does not partition the optimizer)")
        check(not self.offload_params or self.zero_stage == 3, "offload_params", "needs zero_stage 3")


@dataclass
class PretrainConfig:
    run_dir: str = option("runs/pretrain", "where checkpoints, metrics and the encoder go")
    seed: int = option(0, "seed of model init, data order and augmentation")
    data: DataConfig = option(DataConfig(), "training data")
    augment: dict[str, Any] = option({}, "the augmentation chain: an ordered mapping NAME -> {op settings}, "
                                     "waveform ops first, then log-mel ops (the ops are listed below)")
    frontend: FrontendConfig = option(FrontendConfig(), "log-mel features")
    model: ModelConfig = option(ModelConfig(), "encoder and projection head")
    objective: ObjectiveConfig = option(ObjectiveConfig(), "training objective")
    optim: OptimConfig = option(OptimConfig(), "optimizer and schedule")
    train: TrainConfig = option(TrainConfig(), "loop, checkpoints and precision")
    deepspeed: DeepSpeedConfig = option(DeepSpeedConfig(), "the DeepSpeed engine (train.engine=deepspeed)")
    eval: OnlineConfig = option(OnlineConfig(), "the online probe: kNN (and the linear probe) during training")

    def __post_init__(self) -> None:
        backend = backend_class(self.data.backend)
        check(bool(self.data.shards or self.data.sources) or not backend.reads_shards, "data.shards",
              "is required (a folder with manifest.json), or data.sources")
        backend.check(self.data)
        OBJECTIVES[self.objective.name].check(self)
        for op in parse_chain(self.augment):
            check(all(v < self.data.num_views for v in op.views), f"augment.{op.label}.views",
                  f"{op.views} names a view that does not exist (data.num_views = {self.data.num_views})")
