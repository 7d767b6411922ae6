"""Contrastive pretraining: ``audioclr pretrain --config X.yaml [a.b=v ...]``.

Also ``python -m trainer.pretrain`` and ``torchrun ... -m trainer.pretrain``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from dataio.augment import build_augmenter
from dataio.batch import Batch, DataError, Placement, steps_per_epoch
from dataio.formats import check_recipe_frontend
from dataio.manifest import ManifestError, load_manifest, load_sources
from dataio.pipeline import open_source
from dataio.remote import Retry
from dataio.schema import cli_number
from dataio.synthetic import synthetic_manifest
from dataio.torch_pipeline import die_with_parent
from trainer.checkpoint import (
    ENGINE,
    Checkpointer,
    CheckpointError,
    encoder_meta,
    export_encoder,
    rng_state,
    set_rng_state,
)
from trainer.commands import Stopped, config_parser, print_help_config, run_guarded, setup_logging
from trainer.config import ConfigError, PretrainConfig, load_config, save_config, to_dict
from trainer.metrics import MetricWriter
from trainer.models.encoders import build_encoder, load_pretrained
from trainer.objectives import ObjectiveContext, build_objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel import distributed
from trainer.parallel.engine import build_engine
from trainer.parallel.gradcache import GradCache
from trainer.parallel.sync_bn import convert_global_bn
from trainer.precision import autocast_dtype, cpu_computes_bf16  # noqa: F401  (deepspeed_engine reads it here)
from trainer.safe_files import describe_error
from trainer.speed import compile_encoder, set_cudnn_benchmark, wants_compile
from trainer.telemetry import Telemetry
from trainer.threads import set_threads

log = logging.getLogger("audioclr.pretrain")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # each: save a checkpoint, exit 128 + signal


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, ...); the message says why."""


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' asked for but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Pretrainer:
    """Builds everything from a config, then ``train()`` runs (or resumes) the run."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device, distributed.env_info().local_rank)
        self.threads = set_threads(cfg.train.threads, self.device)
        log.info("CPU threads: %d", self.threads)
        if cfg.train.engine == "deepspeed":
            from trainer.parallel.deepspeed_engine import check_section
            check_section(cfg, self.device)
        self.info = distributed.init(self.device.type, always=cfg.train.engine == "deepspeed")
        self.run_dir = Path(cfg.run_dir)
        retry = Retry.of(cfg.data)
        self.manifest = load_sources(cfg.data.sources, retry) if cfg.data.sources else \
            load_manifest(cfg.data.shards, retry=retry) if cfg.data.shards else \
            synthetic_manifest(cfg.data, cfg.frontend)
        check_recipe_frontend(cfg.frontend, self.manifest)
        self.steps_per_epoch = steps_per_epoch(cfg.data, self.manifest, self.info.world_size)
        self.augmenter = build_augmenter(cfg.augment, cfg.frontend, cfg.data.view_seconds,
                                         num_views=cfg.data.num_views, pairs_per_clip=cfg.data.pairs_per_clip,
                                         seed=cfg.seed, clip_format=self.manifest.clip_format)
        if self.augmenter:
            log.info("augmentation: %s", self.augmenter.describe())
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        if self.info.is_main:
            prepare_run_dir(self.run_dir)  # config.yaml and metrics are written once a resume is accepted
        distributed.barrier()
        self.objective = build_objective(cfg.objective, cfg.model, ObjectiveContext(
            rank=self.info.rank, world_size=self.info.world_size, device=self.device,
            num_clips=self.manifest.num_clips, num_classes=len(self.manifest.vocabulary),
            total_steps=self.total_steps, seed=cfg.seed))
        self.engine = self._build_engine()
        self.telemetry = Telemetry(self.device, cfg.data.batch_size)
        self.engine.watch_allreduce(self.telemetry)
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.info, self.device)
        self.metrics: MetricWriter | None = None
        self.step = 0
        self.stop_signal = 0  # SIGTERM or SIGINT, once received: save and leave
        self._signalled_at = 0.0
        self._last_loss: float | None = None
        self._data_state = None  # a data back end's own position (DALI), from the checkpoint
        self.source = None
        self._started = time.perf_counter()

    def _build_engine(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        encoder = build_encoder(cfg.model.encoder, in_channels=cfg.frontend.channels, width=cfg.model.width)
        if cfg.model.pretrained:
            try:
                report = load_pretrained(encoder, cfg.model.pretrained)
            except (OSError, ValueError) as err:
                raise ConfigError(f"model.pretrained: {err}") from None
            log.info("encoder weights from %s: %s", cfg.model.pretrained, report)
        model = self.objective.build_model(encoder)
        if cfg.model.global_bn:
            model = convert_global_bn(model)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.objective.attach(model)
        self._compile(model)
        torch.manual_seed(cfg.seed + 7919 * (self.info.rank + 1))
        fused = cfg.optim.kernel == "fused" or (cfg.optim.kernel == "auto" and self.device.type == "cuda"
                                                and cfg.optim.name == "sgd")
        optimizer = build_optimizer(cfg.optim.name, model, cfg.optim.lr, cfg.optim.momentum,
                                    cfg.optim.weight_decay, cfg.optim.lars_eta, fused=fused)
        o = cfg.optim
        warmup = o.warmup_steps or int(round(o.warmup_epochs * self.steps_per_epoch))
        scheduler = build_scheduler(optimizer, warmup, self.total_steps, o.final_lr_ratio, schedule=o.schedule,
                                    steps_per_epoch=self.steps_per_epoch, milestones=o.milestones, decay=o.decay)
        dtype = autocast_dtype(cfg.train.precision, self.device)
        engine = build_engine(cfg.train.engine, model, optimizer, scheduler, self.device, dtype, cfg.optim.grad_clip,
                              deepspeed=cfg.deepspeed, batch_size=cfg.data.batch_size)
        log.info("engine: %s; precision: %s (train.precision=%s)", describe_engine(engine),
                 "bf16 autocast" if engine.autocast_dtype else "no autocast", cfg.train.precision)
        return engine

    def _compile(self, model: torch.nn.Module) -> None:
        """``train.compile`` and ``train.cudnn_benchmark``, before the engine wraps the model."""
        cfg = self.cfg
        set_cudnn_benchmark(cfg.train.cudnn_benchmark, self.device)
        if not wants_compile(cfg.train.compile, self.device):
            return
        if cfg.train.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3:
            if cfg.train.compile == "on":
                raise ConfigError("train.compile: on is not supported with deepspeed.zero_stage=3 (ZeRO-3 "
                                  "gathers each layer's weights inside the forward); use train.compile=off")
            log.info("train.compile=auto: off under ZeRO-3")
            return
        f = cfg.frontend
        frames = f.num_frames(int(round(cfg.data.view_seconds * f.sample_rate)))
        views = torch.zeros(cfg.data.batch_size, cfg.data.num_views, f.channels, f.n_mels, frames, device=self.device)
        dtype = autocast_dtype(cfg.train.precision, self.device)
        log.info("encoder: %s", compile_encoder(model, cfg.train.compile, self.device,
                                                 self.objective.model_views(views), dtype))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        shared = {"objective": self.objective.state_dict(), "step": self.step,
                  "steps_per_epoch": self.steps_per_epoch, "world_size": self.info.world_size,
                  "config": to_dict(self.cfg)}
        path = self.checkpointer.save(self.step, shared, {"rng": rng_state(), "data": self.source.state()},
                                      self.engine)
        log.info("checkpoint %s", path)
        return path

    def maybe_resume(self) -> None:
        choice = self.cfg.train.resume
        folder = self.checkpointer.resume_point() if choice == "auto" else None if choice == "none" else Path(choice)
        if folder is None:
            return
        try:
            shared, mine, meta = self.checkpointer.load(folder)
        except CheckpointError as err:
            raise (ConfigError(f"train.resume: {err}") if choice != "auto" else err) from None
        why_not = self.engine.can_load(meta, self.info.world_size, int(meta.get("world_size", 0)))
        if why_not:
            raise ConfigError(f"train.resume: checkpoint {folder} cannot resume here: {why_not}. "
                              f"{how_to_resume(meta, folder)}")
        self._check_same_model(shared.get("config", {}), folder)
        self._report_differences(shared)
        try:
            self.engine.load(folder / ENGINE)
            self.objective.load_state_dict(shared["objective"])
        except (CheckpointError, KeyError, RuntimeError, ValueError) as err:
            if isinstance(err, CheckpointError) and "does not fit" not in str(err):
                raise
            raise ConfigError(f"train.resume: checkpoint {folder} does not fit this model ({describe_error(err)}). "
                              f"{START_ELSEWHERE}") from None
        self.step = int(shared["step"])
        if mine is not None:
            set_rng_state(mine["rng"])
            self._data_state = mine.get("data")
        if shared.get("world_size") != self.info.world_size and self.cfg.data.backend == "dali":
            log.warning("resume: %s ranks, was %s: the DALI readers restart their epoch",
                        self.info.world_size, shared.get("world_size"))
            self._data_state = None
        log.info("resumed from %s at step %d", folder, self.step)

    def _check_same_model(self, old_config: dict, folder: Path) -> None:
        """A checkpoint of another model (objective, encoder, sizes, input) cannot continue:
        one message, before anything is loaded or written."""
        old, new = _flatten(old_config), _flatten(to_dict(self.cfg))
        differ = [f"{k}: {old[k]!r} there, {new.get(k)!r} here" for k in sorted(old)
                  if k.startswith(MODEL_KEYS) and k not in NOT_MODEL_KEYS and old[k] != new.get(k)]
        if differ:
            raise ConfigError(f"train.resume: {folder} holds another model ({'; '.join(differ)}). {START_ELSEWHERE}")

    def open_run(self) -> None:
        """The run's own files, once it is known to start or to continue here."""
        if self.info.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.metrics = MetricWriter(self.run_dir, self.info.is_main, self.cfg.train.tensorboard)
        if self.step:
            self.metrics.truncate_after(self.step)

    def _report_differences(self, shared: dict) -> None:
        old, new = _flatten(shared.get("config", {})), _flatten(to_dict(self.cfg))
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and key != "train.resume":
                log.warning("resume: %s was %r, now %r", key, old.get(key), new.get(key))
        if shared.get("steps_per_epoch") != self.steps_per_epoch:
            log.warning("resume: %s steps per epoch, was %s: the data position is approximate",
                        self.steps_per_epoch, shared.get("steps_per_epoch"))

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Run to ``total_steps`` (or until SIGTERM); returns 'finished' or 'interrupted'."""
        self.maybe_resume()
        self.open_run()
        place = Placement(rank=self.info.rank, world_size=self.info.world_size, seed=self.cfg.seed,
                          device=self.device, steps=self.steps_per_epoch)
        self.source = open_source(self.cfg.data, self.manifest, self.cfg.frontend, self.augmenter, place,
                                  state=self._data_state)
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        bar = self._progress_bar()
        try:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                counts = {"skipped": 0, "short": 0}
                for name in self.manifest.sources:
                    counts[f"{name.name}_clips"] = 0
                for batch in self._timed(self.source.epoch(epoch, start)):
                    counts["skipped"] += batch.skipped
                    counts["short"] += batch.short
                    for name, n in zip(self.manifest.sources, batch.sources or []):
                        counts[f"{name.name}_clips"] += n
                    stop = self.train_step(batch)
                    bar.update(1)
                    if self._last_loss is not None:
                        bar.set_postfix(loss=f"{self._last_loss:.3f}", refresh=False)
                    if stop:
                        self.save_checkpoint()
                        log.warning("stopped by %s at step %d; checkpoint saved, rerun with "
                                    "train.resume=auto to continue", signal.Signals(stop).name, self.step)
                        self.stop_signal = stop
                        return "interrupted"
                    if self.step % self.cfg.train.ckpt_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                self._log_epoch_counts(epoch, counts)
            self.save_checkpoint()
            self.export()
            return "finished"
        except DataError:
            # the data failed between two steps: the model and optimizer are whole. One
            # process saves them; ranks cannot (the others are inside the next step's
            # collectives) and resume from the last periodic checkpoint
            saved = (self.checkpointer.root / f"step_{self.step:08d}").is_dir()
            if self.info.world_size == 1 and self.step and not saved:
                log.warning("the data failed at step %d: saving a checkpoint first", self.step)
                self.save_checkpoint()
            raise
        except RuntimeError as err:
            if self.info.world_size == 1 or not distributed.lost_peer(err):
                raise
            last = self.checkpointer.latest()
            raise distributed.PeerLost(
                f"lost contact with another rank at step {self.step} ({str(err).splitlines()[0][-160:]}); this rank "
                f"stops. The run resumes from {last.name if last else 'the start'} when torchrun restarts the "
                f"group (--max-restarts) or the launch command is rerun") from None
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _timed(self, batches):
        """``batches``, with the time spent waiting for each counted as data wait."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            self.telemetry.waited(time.perf_counter() - start)
            yield batch

    def train_step(self, batch: Batch) -> int:
        """One optimisation step; returns the signal (SIGTERM, SIGINT) when some rank was
        asked to stop, else 0."""
        t0 = time.perf_counter()
        logging_now = (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 == self.total_steps
        tel = self.telemetry
        tel.start_step(detailed=logging_now)
        self.engine.train()
        views = self.objective.model_views(batch.views)
        cache, chunk = None, self.cfg.train.grad_cache_chunk
        with tel.phase("forward"):
            if chunk:
                cache = GradCache(self.engine.forward, views, chunk, self.engine.accumulating)
            out = cache.outputs() if cache else self.engine.forward(views)
            with self.engine.autocast():  # the losses compute their logits in float32 themselves
                # with gradient caching the loss is back-propagated to the cached outputs here
                loss = self.objective.loss_backward(out, batch, chunk) if cache else self.objective.loss(out, batch)
        nonfinite, *stops = distributed.any_rank([not bool(torch.isfinite(loss))] +
                                                 [self.stop_signal == s for s in STOP_SIGNALS], self.device)
        stop = next((s for s, flag in zip(STOP_SIGNALS, stops) if flag), 0)
        if nonfinite:
            raise TrainingError(f"the loss is not finite at step {self.step + 1} (lr {self.engine.lr:.3g}); "
                                f"nothing was updated. Lower optim.lr or raise objective.temperature, "
                                f"and resume from the last checkpoint in {self.checkpointer.root}")
        with tel.phase("backward"):
            if cache is not None:
                cache.backward(backward=self.engine.backward)
            else:
                self.engine.backward(loss)
        with tel.phase("optimizer"):
            grad_norm = self.engine.step()
            if self.objective.reads_model:  # MoCo's momentum update reads every weight
                with self.engine.gathered() as model:
                    self.objective.after_step(model, self.step)
            else:
                self.objective.after_step(self.engine.module, self.step)
        self.step += 1
        tel.step_done(time.perf_counter() - t0)
        if logging_now:
            seconds = time.perf_counter() - t0
            values = distributed.reduce_mean({"loss": loss.item(), "skipped_clips": batch.skipped,
                                              "step_seconds": seconds}, self.device)
            values.update(self.telemetry.record())
            values.update(lr=self.engine.lr, epoch=self.step / self.steps_per_epoch,
                          elapsed=time.perf_counter() - self._started,
                          clips_per_second=self.cfg.data.batch_size * self.info.world_size / max(seconds, 1e-9))
            if grad_norm:
                values["grad_norm"] = grad_norm
            self.metrics.write(self.step, values)
            self._last_loss = values["loss"]
        return stop

    def _log_epoch_counts(self, epoch: int, counts: dict) -> None:
        """Clips left out (undecodable, or short with short_clips=skip) and zero-padded
        (shorter than a view) in this epoch, summed over ranks."""
        totals = distributed.reduce_sum(counts, self.device)
        if totals["skipped"]:
            log.warning("epoch %d: %d clip(s) skipped (undecodable, or too short with short_clips=skip)",
                        epoch, totals["skipped"])
        if totals["short"]:  # notes and drum hits are short by nature: padding them is normal
            log.info("epoch %d: %d view(s) zero-padded (clips shorter than a view)", epoch, totals["short"])
        record = {f"epoch_{k}_clips": v for k, v in totals.items() if k in ("skipped", "short")}
        if self.manifest.sources:  # clips each corpus gave this epoch (or since the resume point)
            record.update({f"epoch_clips_{k[:-len('_clips')]}": v for k, v in totals.items() if k.endswith("_clips")})
            log.info("epoch %d: clips per corpus: %s", epoch,
                     ", ".join(f"{k[:-len('_clips')]} {v:.0f}" for k, v in totals.items() if k.endswith("_clips")))
        if totals["skipped"] or totals["short"] or self.manifest.sources:
            self.metrics.write(self.step, record)

    def _progress_bar(self):
        from tqdm import tqdm
        enabled = self.info.is_main and self.cfg.train.progress
        return tqdm(total=self.total_steps, initial=self.step, disable=not enabled,
                    desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr)

    def _on_signal(self, signum, frame) -> None:
        # a second signal leaves now, without a checkpoint; one within 2 s is the same stop
        # arriving twice (a terminal's Ctrl-C reaches the ranks and torchrun, which forwards it)
        if self.stop_signal and time.monotonic() - self._signalled_at > 2.0:
            raise Stopped(signum)
        if self.stop_signal:
            return
        self.stop_signal, self._signalled_at = signum, time.monotonic()
        log.warning("%s received: finishing the step, then saving a checkpoint", signal.Signals(signum).name)

    def export(self) -> None:
        """Rank 0 writes the encoder (every rank enters: ZeRO-3 gathers the weights)."""
        error = None
        with self.engine.gathered() as model:
            if self.info.is_main:
                encoder = model.encoder
                meta = encoder_meta(self.cfg.model.encoder, self.cfg.model.width, self.cfg.frontend,
                                    encoder.embedding_dim, self.step, self.cfg.data.view_seconds)
                # on a CPU the sums' order, so the last bits of every step, follow the thread
                # count; over a run they grow into different weights (the demo's kNN by ~0.05)
                meta["trained_on"] = {"device": self.device.type, "cpu_threads": self.threads,
                                      "world_size": self.info.world_size}
                try:
                    log.info("encoder exported to %s", export_encoder(encoder, meta, self.run_dir))
                except CheckpointError as err:
                    error = err
        if error is not None:
            raise error

    def close(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            self.source.close()  # loader workers stop now, not at interpreter exit
        if self.metrics is not None:
            self.metrics.close()
        distributed.close()


# What makes the model: a checkpoint whose config differs in one of these cannot continue.
MODEL_KEYS = ("model.", "objective.name", "objective.supcon_dim", "objective.queue_size", "frontend.n_mels",
              "frontend.channels")
NOT_MODEL_KEYS = {"model.pretrained", "model.global_bn"}
START_ELSEWHERE = ("To train this config, give it a new run_dir; to start over in this folder, "
                   "train.resume=none (its checkpoints are then replaced as the new run saves)")


def describe_engine(engine) -> str:
    saved = engine.saved_as()
    if saved["engine"] == "deepspeed":
        return f"deepspeed ZeRO-{saved['zero_stage']}, {saved['precision']} weights"
    return saved["engine"]


def how_to_resume(meta: dict, folder: Path) -> str:
    """What a checkpoint holds, and how to go on from it."""
    ranks = meta.get("world_size", "?")
    if meta.get("engine", "ddp") == "deepspeed":
        stage, precision = meta.get("zero_stage"), meta.get("precision", "fp32")
        held = (f"It holds DeepSpeed ZeRO-{stage} state ({precision} weights) from {ranks} rank(s): resume it with "
                f"train.engine=deepspeed deepspeed.zero_stage={stage} deepspeed.precision={precision}" +
                (f" on {ranks} rank(s)" if stage else ""))
    else:
        held = f"It holds DDP state from {ranks} rank(s): resume it with train.engine=ddp (any world size)"
    return (f"{held}. The optimizer state does not convert between engines or ZeRO partitions; to go on "
            f"otherwise, start a new run from its weights with model.pretrained={folder} (a new run_dir)")


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir``, or say in a ConfigError why it cannot be used."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run_dir: cannot write into {run_dir}: {describe_error(err)}") from None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run(cfg: PretrainConfig) -> str:
    """Pretrain with ``cfg``; returns 'finished' or 'interrupted'."""
    return run_trainer(cfg)[0]


def run_trainer(cfg: PretrainConfig) -> tuple[str, int]:
    """('finished' | 'interrupted', the stopping signal or 0)."""
    trainer = Pretrainer(cfg)
    try:
        return trainer.train(), trainer.stop_signal
    finally:
        trainer.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = config_parser("audioclr pretrain", __doc__, "YAML recipe (configs/*.yaml)",
                      "dotted overrides, e.g. optim.lr=0.1 train.epochs=5")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=cli_number(int, 0), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = distributed.env_info()
    rank = info.rank
    setup_logging(rank, info.world_size)
    if args.help_config:
        from dataio.augment import describe_ops
        return print_help_config(PretrainConfig, *describe_ops())

    def work() -> int:
        stop_with_launcher()
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        status, stopped_by = run_trainer(cfg)
        log.info("pretraining %s: %s", status, cfg.run_dir)
        return 128 + stopped_by if stopped_by else 0

    # errors every rank meets alike (a config, a NaN loss) are printed by rank 0 only;
    # one rank's data or disk: that rank says so
    return run_guarded("audioclr pretrain", work, input_errors=(ConfigError, ManifestError, ValueError),
                       run_errors=(TrainingError,), quiet=rank != 0,
                       own_errors=(DataError, CheckpointError, distributed.PeerLost),
                       on_interrupt="error: interrupted before a checkpoint could be saved")


def stop_with_launcher() -> None:
    """A rank started by a launcher (torchrun, the deepspeed launcher) gets SIGTERM when
    the launcher dies: it saves a checkpoint and exits, as for a scheduler's stop. torchrun
    starts every rank in a session of its own, so a launcher killed with -9 would otherwise
    leave its ranks training on, unseen, beside the rerun that resumes their run."""
    if "LOCAL_RANK" not in os.environ:
        return
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # it died before the line above took effect
        raise TrainingError("the launcher of this rank is gone; rerun the launch command to resume")


if __name__ == "__main__":
    sys.exit(main())
