"""The online probe: the run's current encoder scored on a labelled set while it trains.

``eval.online=DIR`` names a labelled shard folder with folds. Every ``eval.every`` epochs
and at the end, the training process embeds its clips with the current encoder (each rank
a contiguous share, gathered in clip order) and scores kNN (and with ``eval.linear`` the
linear probe) by leave-one-fold-out with `audioclr eval`'s own code and defaults, so a
score equals what ``audioclr eval --protocol knn`` gives on an encoder exported at that
step. Rank 0 scores and writes ``online_knn`` (``online_linear``) to ``metrics.jsonl``,
TensorBoard and the progress bar; the other ranks go on to the next step, whose
collective waits for rank 0 within the process group's time limit.

The clips are read once, at start, where a folder without labels or folds, of another
sample rate, or of stored log-mels stops the run (exit 2) before it trains. They stay in
memory, so a folder that disappears mid-run costs nothing; a score that fails (a
non-finite embedding) is a warning, and training goes on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dataio.errors import ConfigError, ManifestError
from dataio.frontend import FrontendConfig
from dataio.reading.manifest import load_manifest
from trainer.evaluate.clips import ClipSet, load_clipset
from trainer.evaluate.config import EvalConfig, OnlineConfig
from trainer.evaluate.embed import ClipEmbeddings, embed_clips
from trainer.evaluate.protocol import labelled
from trainer.evaluate.run import Evaluation, patching
from trainer.parallel import distributed

log = logging.getLogger("audioclr.online")


def load_online_clips(folder: str, frontend: FrontendConfig) -> ClipSet:
    """The labelled clips of ``folder``, or a ConfigError naming the folder and what is wrong."""
    where = f"eval.online={folder}"
    try:
        manifest = load_manifest(folder)
    except (ManifestError, FileNotFoundError, OSError) as err:
        raise ConfigError(f"{where}: {err}") from None
    if manifest.sample_rate != frontend.sample_rate:
        raise ConfigError(f"{where}: the shards are at {manifest.sample_rate} Hz but this recipe's front end "
                          f"is at {frontend.sample_rate} Hz: re-shard them with --sample-rate "
                          f"{frontend.sample_rate}")
    if not manifest.vocabulary:
        raise ConfigError(f"{where}: the shards carry no label vocabulary; the online probe needs labels")
    try:
        clips = load_clipset(manifest, keep_audio=True)  # held: the folder may go away while the run trains
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    rows = np.flatnonzero(labelled(clips))
    if not len(rows):
        raise ConfigError(f"{where}: no clip carries a label of the vocabulary")
    if not (clips.folds[rows] > 0).all() or len(np.unique(clips.folds[rows])) < 2:
        raise ConfigError(f"{where}: the probe scores by leave-one-fold-out, but the labelled clips do not all "
                          f"carry a fold (two folds or more); shard them with a fold column")
    return clips


class OnlineProbe:
    """Scores the live encoder every ``cfg.every`` epochs; :meth:`after_step` is the loop's one call."""

    def __init__(self, cfg: OnlineConfig, frontend: FrontendConfig, view_seconds: float,
                 steps_per_epoch: int, total_steps: int, info: distributed.DistInfo, device: torch.device):
        self.cfg, self.frontend, self.info, self.device = cfg, frontend, info, device
        self.enabled = bool(cfg.online)
        self.every = cfg.every * steps_per_epoch
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.meta = {"view_seconds": view_seconds}
        self.eval_cfg = EvalConfig(split="folds", max_rounds=cfg.max_rounds, pictures=False,
                                   patch_seconds=cfg.patch_seconds)
        self.seconds, self.first = 0.0, 0.0  # probe seconds; when the first step of this process ended
        self.clips = load_online_clips(cfg.online, frontend) if self.enabled else None
        if self.enabled:
            log.info("online probe: %d clips of %s every %d epoch(s)%s", len(self.clips), cfg.online, cfg.every,
                     " (kNN and linear)" if cfg.linear else " (kNN)")

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == self.total_steps)

    def after_step(self, step: int, engine, metrics, bar) -> None:
        """Score when ``step`` is due (every rank enters: the embedding is shared)."""
        now = time.perf_counter()
        self.first = self.first or now
        if not self.due(step):
            return
        start = now
        with engine.gathered() as model:  # ZeRO-3: every weight whole for the duration
            encoder = getattr(model.encoder, "_orig_mod", model.encoder)  # not a compiled wrapper
            scores, error = self.score(encoder)
        self.seconds += time.perf_counter() - start
        try:
            self._report(step, start, scores, error, metrics, bar)
        finally:
            if step == self.total_steps and self.info.is_main:
                log.info(self.summary(time.perf_counter() - self.first))

    def _report(self, step: int, start: float, scores: dict | None, error: str, metrics, bar) -> None:
        if error:
            log.warning("online probe at step %d skipped: %s; training goes on", step, error)
            return
        if scores is None:  # not rank 0
            return
        record = {f"online_{k}": v for k, v in scores.items()}
        record.update(epoch=step / self.steps_per_epoch, online_seconds=time.perf_counter() - start)
        metrics.write(step, record)
        bar.note(**{k: f"{v:.3f}" for k, v in scores.items()})
        log.info("online probe at epoch %g: %s (%.1f s)", record["epoch"],
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), record["online_seconds"])

    def score(self, encoder: torch.nn.Module) -> tuple[dict | None, str]:
        """({protocol: fold-mean primary metric} on rank 0, None elsewhere; an error message or '')."""
        was_training = encoder.training
        try:
            mine, error = self._embed_share(encoder), ""
        except Exception as err:  # noqa: BLE001 - a failed score must not end the run
            mine, error = None, f"{type(err).__name__}: {err}"
        finally:
            encoder.train(was_training)
        shares = distributed.gather_objects((mine, error))  # every rank, once, whatever happened
        errors = [e for _, e in shares if e]
        if errors:
            return None, errors[0]
        if not self.info.is_main:
            return None, ""
        frozen = ClipEmbeddings(np.concatenate([p for (p, _), _ in shares]),
                                np.concatenate([o for (_, o), _ in shares]))
        try:
            return self._scores(encoder, frozen), ""
        except Exception as err:  # noqa: BLE001 - as above
            return None, f"{type(err).__name__}: {err}"

    def _embed_share(self, encoder: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous share of the clips, embedded: (patches, owner rows)."""
        n, world, rank = len(self.clips), self.info.world_size, self.info.rank
        rows = np.arange(n * rank // world, n * (rank + 1) // world)
        patch_s, hop_s = patching(self.eval_cfg, self.meta)
        emb = embed_clips(encoder, self.frontend, self.clips, patch_seconds=patch_s, hop_seconds=hop_s,
                          batch_size=self.eval_cfg.embed_batch, device=self.device, rows=rows)
        return emb.patches, emb.owner

    def _scores(self, encoder: torch.nn.Module, frozen: ClipEmbeddings) -> dict[str, float]:
        out = {}
        for protocol in ("knn", "linear") if self.cfg.linear else ("knn",):
            evaluation = Evaluation(protocol, Path("."), self.cfg.online, self.eval_cfg, clips=self.clips,
                                    frozen=frozen, loaded=(encoder, self.frontend, self.meta))
            result = evaluation.run()
            out[protocol] = float(result["metrics"][evaluation.metric]["mean"])
        return out

    def summary(self, seconds: float) -> str:
        """The probe's share of ``seconds`` of this process's training."""
        share = self.seconds / seconds if seconds > 0 else 0.0
        return f"online probe: {self.seconds:.1f} s in all, {100 * share:.1f}% of the {seconds:.0f} s trained here"
