"""Contrastive pretraining: ``audioclr pretrain --config X.yaml [a.b=v ...]``.

Also ``python -m trainer.pretrain`` and ``torchrun ... -m trainer.pretrain``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dataio.augment import build_augmenter
from dataio.batch import Batch, DataError, Placement, steps_per_epoch
from dataio.manifest import ManifestError, load_manifest
from dataio.pipeline import open_source
from trainer import distributed
from trainer.checkpoint import Checkpointer, CheckpointError, encoder_meta, export_encoder, rng_state, set_rng_state
from trainer.config import ConfigError, PretrainConfig, load_config, save_config, to_dict
from trainer.encoders import build_encoder, load_pretrained
from trainer.engine import ENGINES
from trainer.gradcache import GradCache
from trainer.heads import ContrastiveModel
from trainer.metrics import MetricWriter
from trainer.objectives import ObjectiveContext, build_objective
from trainer.optim import build_optimizer, build_scheduler
from trainer.safe_files import describe_error
from trainer.sync_bn import convert_global_bn

log = logging.getLogger("audioclr.pretrain")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # each: save a checkpoint, exit 128 + signal


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, ...); the message says why."""


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast
    speeds convolutions up instead of emulating them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` on ``device``: the autocast dtype, or None for fp32."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())
    return {"fp32": None, "bf16": torch.bfloat16, "auto": torch.bfloat16 if device.type == "cuda" else None,
            "fast": torch.bfloat16 if native else None}[precision]


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
        self.info = distributed.init(self.device.type)
        self.run_dir = Path(cfg.run_dir)
        self.manifest = load_manifest(cfg.data.shards)
        if self.manifest.sample_rate != cfg.frontend.sample_rate:
            raise ConfigError(f"frontend.sample_rate: {cfg.frontend.sample_rate} differs from the "
                              f"shards' {self.manifest.sample_rate} Hz ({self.manifest.root})")
        self.steps_per_epoch = steps_per_epoch(cfg.data, self.manifest, self.info.world_size)
        self.augmenter = build_augmenter(cfg.augment, cfg.frontend, cfg.data.view_seconds,
                                         num_views=cfg.data.num_views, pairs_per_clip=cfg.data.pairs_per_clip,
                                         seed=cfg.seed)
        if self.augmenter:
            log.info("augmentation: %s", self.augmenter.describe())
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        if self.info.is_main:
            prepare_run_dir(self.run_dir)
            save_config(cfg, self.run_dir / "config.yaml")
        distributed.barrier()
        self.objective = build_objective(cfg.objective, cfg.model, ObjectiveContext(
            rank=self.info.rank, world_size=self.info.world_size, device=self.device,
            num_clips=self.manifest.num_clips, num_classes=len(self.manifest.vocabulary),
            total_steps=self.total_steps, seed=cfg.seed))
        self.engine = self._build_engine()
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.info, self.device)
        self.metrics = MetricWriter(self.run_dir, self.info.is_main, cfg.train.tensorboard)
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
        model = ContrastiveModel(encoder, self.objective.make_head(encoder.embedding_dim))
        if cfg.model.global_bn:
            model = convert_global_bn(model)
        model.to(self.device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.objective.to(self.device).attach(model)
        torch.manual_seed(cfg.seed + 7919 * (self.info.rank + 1))
        trainable = nn.ModuleList([model, self.objective.extra])
        optimizer = build_optimizer(cfg.optim.name, trainable, cfg.optim.lr, cfg.optim.momentum,
                                    cfg.optim.weight_decay, cfg.optim.lars_eta)
        o = cfg.optim
        warmup = o.warmup_steps or int(round(o.warmup_epochs * self.steps_per_epoch))
        scheduler = build_scheduler(optimizer, warmup, self.total_steps, o.final_lr_ratio, schedule=o.schedule,
                                    steps_per_epoch=self.steps_per_epoch, milestones=o.milestones, decay=o.decay)
        dtype = autocast_dtype(cfg.train.precision, self.device)
        log.info("precision: %s (train.precision=%s)", "bf16 autocast" if dtype else "fp32", cfg.train.precision)
        return ENGINES[cfg.train.engine](model, optimizer, scheduler, self.device, dtype, cfg.optim.grad_clip,
                                         extra_params=self.objective.parameters())

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        shared = {"engine": self.engine.state_dict(), "objective": self.objective.state_dict(),
                  "step": self.step, "steps_per_epoch": self.steps_per_epoch,
                  "world_size": self.info.world_size, "config": to_dict(self.cfg)}
        path = self.checkpointer.save(self.step, shared, {"rng": rng_state(), "data": self.source.state()})
        log.info("checkpoint %s", path)
        return path

    def maybe_resume(self) -> None:
        choice = self.cfg.train.resume
        folder = self.checkpointer.resume_point() if choice == "auto" else None if choice == "none" else Path(choice)
        if folder is None:
            return
        try:
            shared, mine = self.checkpointer.load(folder)
        except CheckpointError as err:
            raise (ConfigError(f"train.resume: {err}") if choice != "auto" else err) from None
        self._report_differences(shared)
        self.engine.load_state_dict(shared["engine"])
        self.objective.load_state_dict(shared["objective"])
        self.step = int(shared["step"])
        if mine is not None:
            set_rng_state(mine["rng"])
            self._data_state = mine.get("data")
        if shared.get("world_size") != self.info.world_size and self.cfg.data.backend == "dali":
            log.warning("resume: %s ranks, was %s: the DALI readers restart their epoch",
                        self.info.world_size, shared.get("world_size"))
            self._data_state = None
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", folder, self.step)

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
                for batch in self.source.epoch(epoch, start):
                    counts["skipped"] += batch.skipped
                    counts["short"] += batch.short
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
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def train_step(self, batch: Batch) -> int:
        """One optimisation step; returns the signal (SIGTERM, SIGINT) when some rank was
        asked to stop, else 0."""
        t0 = time.perf_counter()
        self.engine.model.train()
        views = self.objective.model_views(batch.views)
        cache, chunk = None, self.cfg.train.grad_cache_chunk
        if chunk:
            cache = GradCache(self.engine.forward, views, chunk, self.engine.no_sync)
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
        if cache is not None:
            cache.backward()
        else:
            self.engine.backward(loss)
        grad_norm = self.engine.step()
        self.objective.after_step(self.engine.module, self.step)
        self.step += 1
        if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
            seconds = time.perf_counter() - t0
            values = distributed.reduce_mean({"loss": loss.item(), "skipped_clips": batch.skipped,
                                              "step_seconds": seconds}, self.device)
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
        if totals["skipped"] or totals["short"]:
            self.metrics.write(self.step, {f"epoch_{k}_clips": v for k, v in totals.items()})

    def _progress_bar(self):
        from tqdm import tqdm
        enabled = self.info.is_main and self.cfg.train.progress
        return tqdm(total=self.total_steps, initial=self.step, disable=not enabled,
                    desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr)

    def _on_signal(self, signum, frame) -> None:
        # a second signal leaves now, without a checkpoint; one within 2 s is the same stop
        # arriving twice (a terminal's Ctrl-C reaches the ranks and torchrun, which forwards it)
        if self.stop_signal and time.monotonic() - self._signalled_at > 2.0:
            raise KeyboardInterrupt
        if self.stop_signal:
            return
        self.stop_signal, self._signalled_at = signum, time.monotonic()
        log.warning("%s received: finishing the step, then saving a checkpoint", signal.Signals(signum).name)

    def export(self) -> None:
        if not self.info.is_main:
            return
        encoder = self.engine.module.encoder
        meta = encoder_meta(self.cfg.model.encoder, self.cfg.model.width, self.cfg.frontend,
                            encoder.embedding_dim, self.step, self.cfg.data.view_seconds)
        path = export_encoder(encoder, meta, self.run_dir)
        log.info("encoder exported to %s", path)

    def close(self) -> None:
        if self.source is not None and hasattr(self.source, "close"):
            self.source.close()  # loader workers stop now, not at interpreter exit
        self.metrics.close()
        distributed.close()


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
    p = argparse.ArgumentParser(prog="audioclr pretrain", description=__doc__)
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--help-config", action="store_true", help="list every key with its default and doc")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.1 train.epochs=5")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(distributed.env_info().rank)
    if args.help_config:
        from dataio.augment import describe_ops
        from trainer.config import describe
        print("\n".join(describe(PretrainConfig) + describe_ops()))
        return 0
    rank = distributed.env_info().rank

    def report(err, everywhere: bool = False) -> None:
        """Errors every rank meets alike (a config, a NaN loss) are printed by rank 0 only."""
        if everywhere or rank == 0:
            print(f"audioclr pretrain: error: {err}", file=sys.stderr)

    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        status, stopped_by = run_trainer(cfg)
    except KeyboardInterrupt:
        report("interrupted before a checkpoint could be saved")
        return 128 + signal.SIGINT
    except (ConfigError, ManifestError) as err:
        report(err)
        return 2
    except ValueError as err:  # e.g. pretrained weights that do not fit, an objective without labels
        report(err)
        return 2
    except TrainingError as err:
        report(err)
        return 1
    except (DataError, CheckpointError) as err:  # one rank's data or disk: that rank says so
        report(err, everywhere=True)
        return 1
    except OSError as err:  # a full disk or a vanished folder while writing metrics or logs
        report(describe_error(err), everywhere=True)
        return 1
    log.info("pretraining %s: %s", status, cfg.run_dir)
    return 128 + stopped_by if stopped_by else 0


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
