"""The pretraining loop: :class:`Pretrainer` builds the run from a :class:`PretrainConfig`
and trains it, step by step, with checkpoints (the command: :mod:`trainer.cli.pretrain`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path

import torch

from dataio.augment import build_augmenter
from dataio.backends.batch import Batch, Placement, steps_per_epoch
from dataio.backends.registry import backend_class, load_corpus, open_source
from dataio.errors import ConfigError, DataError
from dataio.formats.codec import check_recipe_frontend
from dataio.reading.remote import Retry
from trainer.commands import GracefulStop
from trainer.evaluate.online import OnlineProbe
from trainer.metrics import MetricWriter
from trainer.models.encoders import build_encoder, load_pretrained
from trainer.models.export import encoder_meta, export_encoder
from trainer.objectives import ObjectiveContext, build_objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel import distributed
from trainer.parallel.device import autocast_dtype, pick_device
from trainer.parallel.engines import build_engine, engine_class, how_to_resume
from trainer.parallel.gradcache import GradCache
from trainer.parallel.sync_bn import convert_global_bn
from trainer.safe_files import describe_error
from trainer.speed import compile_encoder, set_cudnn_benchmark, wants_compile
from trainer.threads import set_threads
from trainer.train.checkpoint import (
    ENGINE,
    Checkpointer,
    CheckpointError,
    rng_state,
    set_rng_state,
    slice_reader,
)
from trainer.train.config import PretrainConfig, save_config, to_dict
from trainer.train.resume import START_ELSEWHERE, check_same_model, prepare_run_dir, report_differences
from trainer.train.telemetry import EpochCounts, ProgressBar, Telemetry

log = logging.getLogger("audioclr.pretrain")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # each: save a checkpoint, exit 128 + signal


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, ...); the message says why."""


class Pretrainer:
    """Builds everything from a config, then ``train()`` runs (or resumes) the run."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.train.device, distributed.env_info().local_rank)
        self.threads = set_threads(cfg.train.threads, self.device)
        log.info("CPU threads: %d", self.threads)
        self.engine_class = engine_class(cfg.train.engine)
        for line in self.engine_class.check(cfg, self.device):
            log.info(line)
        self.info = distributed.init(self.device.type, always=self.engine_class.needs_process_group)
        self.run_dir = Path(cfg.run_dir)
        retry = Retry.of(cfg.data)
        self.manifest = load_corpus(cfg.data, cfg.frontend, retry, share=distributed.broadcast_object,
                                    is_main=self.info.is_main)
        check_recipe_frontend(cfg.frontend, self.manifest)
        self.steps_per_epoch = steps_per_epoch(cfg.data, self.manifest, self.info.world_size)
        self.augmenter = build_augmenter(cfg.augment, cfg.frontend, cfg.data.view_seconds,
                                         num_views=cfg.data.num_views, pairs_per_clip=cfg.data.pairs_per_clip,
                                         seed=cfg.seed, clip_format=self.manifest.clip_format)
        if self.augmenter:
            log.info("augmentation: %s", self.augmenter.describe())
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.probe = OnlineProbe(cfg.eval, cfg.frontend, cfg.data.view_seconds, self.steps_per_epoch,
                                 self.total_steps, self.info, self.device)  # reads its clips: exit 2 if unfit
        if self.info.is_main:
            prepare_run_dir(self.run_dir)  # config.yaml and metrics are written once a resume is accepted
        distributed.barrier()
        self.objective = build_objective(cfg.objective, cfg.model, ObjectiveContext(
            rank=self.info.rank, world_size=self.info.world_size, device=self.device,
            num_clips=self.manifest.num_clips, num_classes=len(self.manifest.vocabulary),
            total_steps=self.total_steps, seed=cfg.seed, num_views=cfg.data.num_views))
        self.engine = self._build_engine()
        self.telemetry = Telemetry(self.device, cfg.data.batch_size, self.info.world_size)
        self.engine.watch_allreduce(self.telemetry)
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.info, self.device,
                                         every=cfg.train.ckpt_every, last=self.total_steps)
        self.metrics: MetricWriter | None = None
        self.step = 0
        self.stop = GracefulStop("{signal} received: finishing the step, then saving a checkpoint", log)
        self.counts = EpochCounts(self.manifest.sources, self.device)
        self._data_state = None  # a data back end's own position (DALI), from the checkpoint
        self.source = None

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
        model.to(self.device, memory_format=self.engine_class.memory_format(cfg))
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
                              settings=self.engine_class.settings(cfg), batch_size=cfg.data.batch_size)
        log.info("engine: %s (train.precision=%s)", engine.describe(), cfg.train.precision)
        return engine

    def _compile(self, model: torch.nn.Module) -> None:
        """``train.compile`` and ``train.cudnn_benchmark``, before the engine wraps the model."""
        cfg = self.cfg
        set_cudnn_benchmark(cfg.train.cudnn_benchmark, self.device)
        if not wants_compile(cfg.train.compile, self.device) or not self.engine_class.compiles(cfg):
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
        mine = {"rng": rng_state(), "data": self.source.state(), "slices": self.objective.slice_state()}
        path = self.checkpointer.save(self.step, shared, mine, self.engine)
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
        check_same_model(shared.get("config", {}), to_dict(self.cfg), folder)
        report_differences(shared, to_dict(self.cfg), self.steps_per_epoch)
        try:
            self.engine.load(folder / ENGINE)
            self.objective.load_state_dict(shared["objective"], slice_reader(folder))
        except (CheckpointError, KeyError, RuntimeError, ValueError) as err:
            if isinstance(err, CheckpointError) and "does not fit" not in str(err):
                raise
            raise ConfigError(f"train.resume: checkpoint {folder} does not fit this model ({describe_error(err)}). "
                              f"{START_ELSEWHERE}") from None
        self.step = int(shared["step"])
        if mine is not None:
            set_rng_state(mine["rng"])
            self._data_state = mine.get("data")
        if (shared.get("world_size") != self.info.world_size
                and not backend_class(self.cfg.data.backend).position_holds_at_any_world_size):
            log.warning("resume: %s ranks, was %s: the %s back end's readers restart their epoch",
                        self.info.world_size, shared.get("world_size"), self.cfg.data.backend)
            self._data_state = None
        log.info("resumed from %s at step %d", folder, self.step)

    def open_run(self) -> None:
        """The run's own files, once it is known to start or to continue here."""
        if self.info.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.metrics = MetricWriter(self.run_dir, self.info.is_main, self.cfg.train.tensorboard)
        if self.step:
            self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Run to ``total_steps``, or until a stop signal; returns 'finished' or 'interrupted'."""
        self.maybe_resume()
        self.open_run()
        self.source = self._open_source()
        with self.stop, self._failure_policy(), ProgressBar(self.total_steps, self.step, self._shows_progress()) as bar:
            if self.step >= self.total_steps:
                self._already_finished(bar)
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                for batch in self._timed(self.source.epoch(epoch, start)):
                    self.counts.add(batch)
                    stop = self.train_step(batch)
                    bar.advance(self.telemetry.last_loss)
                    if stop:
                        return self._interrupted(stop)
                    self.probe.after_step(self.step, self.engine, self.metrics, bar)
                    if self.checkpointer.due(self.step):
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
                self.counts.report(epoch, self.step, self.metrics)
            self.save_checkpoint()
            self.export()
            self.engine.close()  # every rank is here: the engine lets go of the group's work
        return "finished"

    def _already_finished(self, bar) -> None:
        """A resumed run that had finished: say so, and let a newly asked online probe score
        the encoder once, instead of ending silently having done nothing."""
        log.info("the run in %s had already finished (step %d of %d): nothing to train%s", self.run_dir, self.step,
                 self.total_steps, "; the online probe scores its encoder once" if self.probe.enabled else
                 "; raise train.epochs or train.max_steps to train on, or choose another run_dir")
        self.probe.after_step(self.step, self.engine, self.metrics, bar)

    def _open_source(self):
        place = Placement(rank=self.info.rank, world_size=self.info.world_size, seed=self.cfg.seed,
                          device=self.device, steps=self.steps_per_epoch)
        return open_source(self.cfg.data, self.manifest, self.cfg.frontend, self.augmenter, place,
                           state=self._data_state)

    def _shows_progress(self) -> bool:
        return self.info.is_main and self.cfg.train.progress

    def _interrupted(self, signum: int) -> str:
        self.save_checkpoint()
        log.warning("stopped by %s at step %d; checkpoint saved, rerun with train.resume=auto to continue",
                    signal.Signals(signum).name, self.step)
        self.stop.signal = signum
        return "interrupted"

    @contextlib.contextmanager
    def _failure_policy(self):
        """What a failure leaves behind. Data that failed between two steps leaves the model
        and optimizer whole: one process saves them first (ranks cannot: the others are
        inside the next step's collectives; they resume from the last periodic checkpoint).
        A lost peer ends this rank with a message saying where the group resumes from."""
        try:
            yield
        except DataError:
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
        recording = (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 == self.total_steps
        tel = self.telemetry
        tel.start_step(detailed=recording)
        self.engine.train()
        with tel.phase("forward"):
            cache, loss = self._forward_loss(batch)
        stop = self._agree_to_go_on(loss)
        with tel.phase("backward"):
            if cache is not None:
                cache.backward(backward=self.engine.backward)
            else:
                self.engine.backward(loss)
        with tel.phase("optimizer"):
            grad_norm = self.engine.step()
            with self.engine.gathered() if self.objective.reads_model else contextlib.nullcontext() as model:
                self.objective.after_step(model, self.step)  # MoCo's momentum update reads every weight
        self.step += 1
        tel.step_done(time.perf_counter() - t0)
        if recording:
            self.metrics.write(self.step, tel.record(loss.item(), batch.skipped, self.engine.lr, grad_norm,
                                                     epoch=self.step / self.steps_per_epoch))
        return stop

    def _forward_loss(self, batch: Batch) -> tuple[GradCache | None, torch.Tensor]:
        """The forward and the loss; with gradient caching (``train.grad_cache_chunk``) the
        loss is back-propagated to the cached outputs here."""
        views, chunk = self.objective.model_views(batch.views), self.cfg.train.grad_cache_chunk
        cache = GradCache(self.engine.forward, views, chunk, self.engine.accumulating) if chunk else None
        out = cache.outputs() if cache else self.engine.forward(views)
        with self.engine.autocast():  # the losses compute their logits in float32 themselves
            return cache, self.objective.loss_backward(out, batch, chunk) if cache else self.objective.loss(out, batch)

    def _agree_to_go_on(self, loss: torch.Tensor) -> int:
        """Whether any rank's loss is not finite (then nothing is updated: TrainingError) or
        any rank was asked to stop (its signal is returned); one collective."""
        nonfinite, *stops = distributed.any_rank([not bool(torch.isfinite(loss))] +
                                                 [self.stop.signal == s for s in STOP_SIGNALS], self.device)
        if nonfinite:
            raise TrainingError(f"the loss is not finite at step {self.step + 1} (lr {self.engine.lr:.3g}); "
                                f"nothing was updated. Lower optim.lr or raise objective.temperature, "
                                f"and resume from the last checkpoint in {self.checkpointer.root}")
        return next((s for s, flag in zip(STOP_SIGNALS, stops) if flag), 0)

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
                dtype = autocast_dtype(self.cfg.train.precision, self.device)
                meta["trained_on"] = {"device": self.device.type, "cpu_threads": self.threads,
                                      "world_size": self.info.world_size,
                                      "autocast": str(dtype).replace("torch.", "") if dtype else "fp32"}
                try:
                    log.info("encoder exported to %s", export_encoder(encoder, meta, self.run_dir))
                except CheckpointError as err:
                    error = err
        if error is not None:
            raise error

    def close(self) -> None:
        if self.source is not None:
            self.source.close()  # loader workers stop now, not at interpreter exit
        if self.metrics is not None:
            self.metrics.close()
        distributed.close()


def run(cfg: PretrainConfig) -> str:
    """Pretrain with ``cfg``; returns 'finished' or 'interrupted'."""
    return run_trainer(cfg)[0]


def run_trainer(cfg: PretrainConfig) -> tuple[str, int]:
    """('finished' | 'interrupted', the stopping signal or 0)."""
    trainer = Pretrainer(cfg)
    try:
        return trainer.train(), trainer.stop.signal
    finally:
        trainer.close()
