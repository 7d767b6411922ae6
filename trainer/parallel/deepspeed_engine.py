"""DeepSpeed's ZeRO (stages 0-3) behind audioclr's engine interface.

The recipe stays audioclr's: DeepSpeed gets the client optimizer and LR schedule, the
per-rank batch as its micro-batch with no gradient accumulation of its own (splitting a
contrastive batch would remove negatives; big batches come from gradient caching, whose
chunk backwards run inside ``accumulating()``), and the clipping threshold. Embeddings
are gathered across ranks by audioclr's own differentiable collectives, so the loss and
its gradients are those of DDP; ZeRO only changes where optimizer state, gradients and
(stage 3) parameters live.

Checkpoints: ``save(folder)`` writes DeepSpeed's own sharded files (``mp_rank_00_*`` and
one ``zero_pp_rank_R_*`` per rank) under ``folder/deepspeed/``, inside the checkpointer's
``step_N.tmp`` so they are verified and renamed with the rest. They are read back through
:class:`SafeCheckpointEngine`: ``torch.load(weights_only=True)`` with the few DeepSpeed
classes those files hold allow-listed, so a planted file runs no code.

On a CPU, DeepSpeed's CPU accelerator is used (``DS_ACCELERATOR=cpu``) and its
collectives run over the gloo process group audioclr sets up.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from dataio.errors import ConfigError
from trainer.parallel import distributed
from trainer.parallel.device import cpu_computes_bf16
from trainer.parallel.engine import Engine, save_weights
from trainer.safe_files import CheckpointError, load_tensors

log = logging.getLogger(__name__)

TAG = "deepspeed"  # the sub-folder of the engine folder DeepSpeed writes into

# keys of a DeepSpeed config that audioclr sets itself, and the audioclr key that does
OWN_KEYS = {"train_batch_size": "data.batch_size", "train_micro_batch_size_per_gpu": "data.batch_size",
            "gradient_accumulation_steps": "train.grad_cache_chunk (a contrastive batch is never split)",
            "optimizer": "optim.name", "scheduler": "optim.schedule", "gradient_clipping": "optim.grad_clip",
            "bf16": "deepspeed.precision", "fp16": "deepspeed.precision", "amp": "deepspeed.precision",
            "zero_allow_untested_optimizer": "optim.name"}
OWN_ZERO_KEYS = {"stage": "deepspeed.zero_stage", "offload_optimizer": "deepspeed.offload_optimizer",
                 "offload_param": "deepspeed.offload_params", "reduce_bucket_size": "deepspeed.reduce_bucket_size",
                 "allgather_bucket_size": "deepspeed.allgather_bucket_size",
                 "overlap_comm": "deepspeed.overlap_comm"}
# top-level sections DeepSpeed reads besides its scalar keys (deepspeed.runtime.constants)
SECTIONS = ("zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard",
            "csv_monitor", "wandb", "comet", "aio", "checkpoint", "data_types", "compile", "torch_autocast",
            "timers", "elasticity", "autotuning", "nebula", "compression_training", "data_efficiency",
            "curriculum_learning", "sparse_attention", "pipeline", "hybrid_engine", "weight_quantization")


def import_deepspeed(device: torch.device):
    """``deepspeed``, on the CPU accelerator when training on a CPU (it would pick CUDA
    wherever a GPU is visible); a ConfigError saying how to install it when it is absent."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # deferred: DeepSpeed is optional and slow to import
    except ImportError as err:
        raise ConfigError(f"train.engine: deepspeed cannot be imported ({err}); install it with "
                          f"`pip install -e .` (setup.cfg pins it)") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").addFilter(_quiet)
    return deepspeed


def _quiet(record: logging.LogRecord) -> bool:
    """Leave out the warning every run with an audioclr optimizer would print (SGD, AdamW
    and LARS at stage 0 are exact under ZeRO: they work element by element)."""
    return "untested optimizer" not in record.getMessage()


def known_keys() -> set[str]:
    import deepspeed.runtime.constants as constants  # deferred: DeepSpeed is optional and slow to import

    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    return names | set(SECTIONS)


MAX_BUCKET = 500_000_000  # DeepSpeed's default bucket size, in elements


def build_config(section, batch_size: int, grad_clip: float, device: torch.device,
                 num_params: int = MAX_BUCKET) -> dict:
    """The DeepSpeed config dict of a ``deepspeed:`` section (``PretrainConfig.deepspeed``);
    auto-sized buckets hold the ``num_params`` of the model at most."""
    reduce = section.reduce_bucket_size or min(MAX_BUCKET, -(-max(num_params, 1) // 1024) * 1024)  # aligned
    zero = {"stage": section.zero_stage, "reduce_bucket_size": reduce,
            "allgather_bucket_size": section.allgather_bucket_size or reduce, "overlap_comm": section.overlap_comm}
    pin = device.type == "cuda"
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if section.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": grad_clip, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2 ** 31 - 1, "wall_clock_breakdown": False,
              "bf16": {"enabled": section.precision == "bf16"},
              "fp16": {"enabled": section.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
              "zero_optimization": zero}
    known = None
    for key, value in section.config.items():
        where = f"deepspeed.config.{key}"
        if key in OWN_KEYS:
            raise ConfigError(f"{where}: audioclr sets this itself; use {OWN_KEYS[key]}")
        if key == "zero_optimization":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: must be a mapping")
            for sub, sub_value in value.items():
                if sub in OWN_ZERO_KEYS:
                    raise ConfigError(f"{where}.{sub}: audioclr sets this itself; use {OWN_ZERO_KEYS[sub]}")
                zero[sub] = sub_value
            continue
        known = known or known_keys()
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=3)
            raise ConfigError(f"{where}: not a DeepSpeed config key" +
                              (f" (did you mean {', '.join(near)}?)" if near else ""))
        config[key] = value
    return config


def check_offload_memory(ds, params: int, optimizer: torch.optim.Optimizer) -> None:
    """Offload needs host memory for the fp32 master weights, their gradients and the
    optimizer state (``optimizer``'s slots per parameter) of this node's share of
    ``params`` parameters: refuse when it is plainly not there."""
    import psutil  # deferred: only an offload run needs it

    slots = 2 if isinstance(optimizer, torch.optim.AdamW) else 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    world = max(1, distributed.env_info().world_size)
    need = params * 4 * (2 + slots) * per_node // world
    if ds.offload_params:
        need += params * 4 * per_node
    free = psutil.virtual_memory().available
    if need > free:
        raise ConfigError(f"deepspeed.offload_optimizer: offloading needs about {need / 2**30:.1f} GiB of host "
                          f"memory on this node ({params / 1e6:.1f} M parameters, {type(optimizer).__name__}), and "
                          f"{free / 2**30:.1f} GiB is free; raise the world size or offload less")


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the model, with audioclr's optimizer and schedule."""

    name = "deepspeed"
    needs_process_group = True

    @classmethod
    def check(cls, cfg, device: torch.device) -> list[str]:
        ds, left_off = cfg.deepspeed, []
        if cfg.train.channels_last:  # it flattens every weight into contiguous buckets
            left_off.append("train.channels_last: off under DeepSpeed (it keeps every weight as a contiguous slice "
                            "of its flat buffers)")
        if ds.zero_stage == 3 and cfg.train.compile != "off":
            if cfg.train.compile == "on":
                raise ConfigError("train.compile: on is not supported with deepspeed.zero_stage=3 (ZeRO-3 "
                                  "gathers each layer's weights inside the forward); use train.compile=off")
            left_off.append("train.compile=auto: off under ZeRO-3")
        if ds.precision == "fp16" and device.type != "cuda":
            raise ConfigError("deepspeed.precision: fp16 needs a CUDA device (DeepSpeed's loss scaling); "
                              "use bf16 or fp32 on a CPU")
        if ds.precision == "bf16" and device.type == "cpu" and not cpu_computes_bf16():
            raise ConfigError("deepspeed.precision: bf16 asked for, but this CPU has no bf16 arithmetic "
                              "(AVX512-BF16 or AMX); use fp32")
        if ds.precision != "fp32" and cfg.train.precision in ("bf16", "fast"):
            raise ConfigError(f"train.precision: {cfg.train.precision} (autocast) and deepspeed.precision: "
                              f"{ds.precision} both set the precision; keep one: deepspeed.precision for "
                              f"low-precision weights, or train.precision with deepspeed.precision=fp32")
        if cfg.optim.name == "lars" and ds.zero_stage >= 1:
            raise ConfigError("optim.name: lars scales each layer by its own trust ratio, but ZeRO >= 1 hands "
                              "the optimizer flat slices of many layers; use deepspeed.zero_stage=0 or "
                              "optim.name=sgd/adamw")
        build_config(ds, cfg.data.batch_size, cfg.optim.grad_clip, device)
        return left_off

    @classmethod
    def settings(cls, cfg):
        return cfg.deepspeed

    @classmethod
    def memory_format(cls, cfg) -> torch.memory_format:
        return torch.contiguous_format

    @classmethod
    def compiles(cls, cfg) -> bool:
        return cfg.deepspeed.zero_stage < 3

    @classmethod
    def resume_hint(cls, saved: dict) -> str:
        stage, precision, ranks = saved.get("zero_stage"), saved.get("precision", "fp32"), saved.get("world_size", "?")
        return (f"It holds DeepSpeed ZeRO-{stage} state ({precision} weights) from {ranks} rank(s): resume it with "
                f"train.engine=deepspeed deepspeed.zero_stage={stage} deepspeed.precision={precision}" +
                (f" on {ranks} rank(s)" if stage else ""))

    def describe(self) -> str:
        how = f"{self.section.precision} weights" if self.section.precision != "fp32" else \
            "bf16 autocast" if self.autocast_dtype else "no autocast"
        return f"deepspeed ZeRO-{self.stage}; {how}"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                 autocast_dtype: torch.dtype | None, *, grad_clip: float = 0.0, batch_size: int = 1,
                 settings=None):
        super().__init__(model, optimizer, scheduler, device, autocast_dtype)
        section = settings
        params = sum(p.numel() for p in model.parameters())
        if section.offload_optimizer or section.offload_params:
            check_offload_memory(section, params, optimizer)
        deepspeed = import_deepspeed(device)
        self.section, self.stage = section, section.zero_stage
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(section.precision)
        if section.precision != "fp32":
            self.autocast_dtype = None
        config = build_config(section, batch_size, grad_clip, device, params)
        if not distributed.is_initialized():
            raise RuntimeError("the deepspeed engine needs a process group (trainer.parallel.distributed.init)")
        info = distributed.env_info()  # DeepSpeed reads them even for one process
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False,
                                   verbose=False)
        try:
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler, config=config,
                dist_init_required=False)
        except (ValueError, TypeError, AssertionError) as err:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"deepspeed: DeepSpeed refused the configuration: "
                              f"{' '.join(str(err).split())[:600]}") from None
        self.ds.checkpoint_engine = SafeCheckpointEngine(self.ds.checkpoint_engine)
        self.module = self.ds.module

    def forward(self, views, *args, **kwargs):
        if self.input_dtype is not None and views.is_floating_point():
            views = views.to(self.input_dtype)
        with self.autocast():
            return self.ds(views, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    @contextlib.contextmanager
    def accumulating(self):
        """Backwards inside add to the step's gradients; the reduction and the update
        wait for the step's last backward, outside."""
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def step(self) -> float:
        self.ds.step()
        norm = self.ds.get_global_grad_norm() if self.ds.gradient_clipping() > 0 else None
        return float(norm) if norm is not None else 0.0

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @contextlib.contextmanager
    def gathered(self):
        """ZeRO-3: every parameter gathered on every rank for the duration (collective;
        read-only: changes are not kept). Stages 0-2 hold whole parameters already."""
        if self.stage < 3:
            yield self.module
            return
        import deepspeed  # deferred: DeepSpeed is optional and slow to import
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield self.module

    def close(self) -> None:
        self.ds.destroy()  # ZeRO-3's hooks and parameter coordinator hold gather work
        super().close()

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def saved_as(self) -> dict:
        return {"engine": self.name, "zero_stage": self.stage, "precision": self.section.precision}

    def can_load(self, saved: dict, world_size: int, saved_world_size: int) -> str | None:
        written = saved.get("engine", "ddp")
        if written != self.name:
            return f"it was written by the {written} engine and this run uses {self.name}"
        if saved.get("zero_stage") != self.stage:
            return f"it was written under ZeRO-{saved.get('zero_stage')} and this run uses ZeRO-{self.stage}"
        if saved.get("precision", "fp32") != self.section.precision:
            return f"its weights are {saved.get('precision')} and this run's are {self.section.precision}"
        if saved_world_size != world_size and self.stage >= 1:
            return (f"ZeRO-{self.stage} splits its state across ranks, and it was written by "
                    f"{saved_world_size} ranks, this run has {world_size}")
        return None

    def save(self, folder: Path) -> None:
        """Every rank writes its shard into ``folder/deepspeed`` (a collective); rank 0
        also writes the whole model as ``weights.safetensors`` (what model.pretrained reads)."""
        self.ds.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False)
        with self.gathered() as model:
            if distributed.env_info().is_main:
                save_weights(model, folder)
                for script in folder.glob("*.py"):  # DeepSpeed's recovery scripts: a checkpoint holds no code
                    script.unlink()

    def load(self, folder: Path) -> None:
        if not (folder / TAG).is_dir():
            raise CheckpointError(f"{folder}: holds no DeepSpeed checkpoint ({TAG}/)")
        path, _ = self.ds.load_checkpoint(str(folder), tag=TAG, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{folder / TAG}: DeepSpeed found no checkpoint to load")


def _safe_classes() -> list:
    """What DeepSpeed's checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum  # deferred: DeepSpeed is optional and slow to import
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with its ``load`` replaced: tensors, plain values
    and the allow-listed DeepSpeed classes only (``weights_only=True``)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_safe_classes()):
            return load_tensors(path)
