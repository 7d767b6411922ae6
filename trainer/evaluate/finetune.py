"""Fine-tuning of one round: the whole encoder (saved weights or random init, the
papers' "scratch" baseline) with a new linear head, trained on one random crop of each
training clip per epoch, with cross-entropy or SoundCLR's hybrid loss
``alpha * SupCon + (1 - alpha) * CE``. A clip's scores are the mean of its patches'
softmax (sigmoid for multi-label) outputs.

No audio is held: each epoch reads the training clips' shards again, in a seeded order,
through a bounded shuffle buffer of crops (:func:`epoch_crops`), and scoring decodes each
clip as it is embedded, so memory grows with the embeddings, not with the corpus. An
epoch is a pure function of (seed, epoch): a rerun, and a run resumed at an epoch's end,
train on the same crops in the same batches."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import closing
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataio.augment.keyed import scalar_key
from dataio.backends.views import random_gains
from dataio.frontend import FrontendConfig, LogMel
from dataio.reading.streams import Shuffled
from trainer.evaluate.clips import ClipSet
from trainer.evaluate.config import FinetuneConfig
from trainer.evaluate.embed import ClipEmbeddings, patch_batches
from trainer.evaluate.learners import clip_average
from trainer.evaluate.protocol import Round
from trainer.models.heads import LinearProjection
from trainer.objectives.supcon import classification_loss, hybrid_loss, supcon_loss
from trainer.optim import build_optimizer, warmup_cosine


def epoch_crops(clips: ClipSet, rows: np.ndarray, size: int, gain_db: float, buffer: int, *, seed: int,
                epoch: int) -> Iterator[tuple[int, np.ndarray]]:
    """(row, float32 crop [size] samples) of each of ``rows`` once, in epoch ``epoch``'s
    order: the shards holding them read in an order drawn from (seed, epoch), each clip's
    random crop and gain (+-``gain_db`` dB) drawn from (seed, epoch, row) as it is read,
    then a shuffle buffer of ``buffer`` int16 crops keyed by (seed, epoch)."""
    shards = np.random.default_rng([seed, epoch]).permutation(np.unique(clips.shard_of[rows]))

    def read() -> Iterator[tuple]:
        for row, data in clips.encoded(rows, shards):
            rng = np.random.default_rng([seed, epoch, row])
            yield epoch, (row, clips.crop(data, size, rng), random_gains(1, gain_db, rng)[0, 0])

    scale = clips.codec.format.scale
    for _, (row, crop, gain) in Shuffled(read(), buffer, scalar_key(seed, epoch)):
        yield row, (crop * (scale * gain)).astype(np.float32)


class FineTuner:
    """Encoder + head (+ projection for the hybrid loss) of one round."""

    def __init__(self, clips: ClipSet, encoder: nn.Module, frontend: FrontendConfig, rnd: Round,
                 cfg: FinetuneConfig, *, patch: int, hop: int, embed_batch: int, seed: int,
                 device: torch.device):
        self.clips, self.rnd, self.cfg, self.seed, self.device = clips, rnd, cfg, seed, device
        self.patch, self.hop, self.embed_batch = patch, hop, embed_batch
        torch.manual_seed(seed)
        dim = encoder.embedding_dim
        self.model = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": nn.Linear(dim, clips.num_classes)})
        if cfg.loss == "hybrid":
            self.model["projection"] = LinearProjection(dim, cfg.proj_dim)
        self.model.to(device)
        self.logmel = LogMel(frontend).to(device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, cfg.lr, cfg.momentum, cfg.weight_decay, 0.0)
        steps = max(1, len(rnd.train) // cfg.batch_size)
        warmup, total = int(round(cfg.warmup_epochs * steps)), cfg.epochs * steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine(s, warmup, total))

    def _targets(self, rows: np.ndarray) -> torch.Tensor:
        t = self.clips.targets[rows] if self.clips.multilabel else self.clips.labels[rows]
        return torch.from_numpy(t).to(self.device)

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.model["encoder"](feats)
        ce = classification_loss(self.model["head"](h), targets)
        if self.cfg.loss == "ce":
            return ce
        z = self.model["projection"](h)[:, None]  # [B, 1, D]: the labels make the positives
        sc = supcon_loss(z, z, targets, targets, 0, temperature=self.cfg.temperature)
        return hybrid_loss(sc, ce, self.cfg.alpha)

    def train_epoch(self, epoch: int) -> float:
        """One pass over the training clips (:func:`epoch_crops`), full batches only (batch
        norm needs more than one clip; fewer clips than a batch are one batch); returns the
        mean loss."""
        size = min(self.cfg.batch_size, len(self.rnd.train))
        self.model.train()
        total, seen = 0.0, 0
        crops = epoch_crops(self.clips, self.rnd.train, self.patch, self.cfg.gain_db, self.cfg.shuffle_buffer,
                            seed=self.seed, epoch=epoch)
        with closing(crops):  # the last partial batch is dropped: the stream is left unfinished
            for _ in range(len(self.rnd.train) // max(size, 1)):
                rows, waves = zip(*islice(crops, size))
                loss = self._step(np.asarray(rows), np.stack(waves), epoch)
                total, seen = total + loss * len(rows), seen + len(rows)
        return total / max(seen, 1)

    def _step(self, rows: np.ndarray, waves: np.ndarray, epoch: int) -> float:
        """One optimizer step on the crops ``waves`` [B, patch] of clips ``rows`` [B]."""
        loss = self.loss(self.logmel(torch.from_numpy(waves).to(self.device)), self._targets(rows))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss is {float(loss)} at epoch {epoch + 1}: "
                                     f"lower eval.finetune.lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def _patch_outputs(self, rows: np.ndarray):
        self.model.eval()
        for owner, waves in patch_batches(self.clips, rows, self.patch, self.hop, self.embed_batch):
            h = self.model["encoder"](self.logmel(torch.from_numpy(waves).to(self.device)))
            yield owner, h

    @torch.no_grad()
    def clip_scores(self, rows: np.ndarray) -> np.ndarray:
        owners, probs = [], []
        for owner, h in self._patch_outputs(rows):
            logits = self.model["head"](h).float()
            probs.append((torch.sigmoid(logits) if self.clips.multilabel else F.softmax(logits, 1)).cpu().numpy())
            owners.append(owner)
        return clip_average(np.concatenate(owners), np.concatenate(probs), rows)

    @torch.no_grad()
    def embeddings(self, rows: np.ndarray) -> ClipEmbeddings:
        """Patch embeddings of the fine-tuned encoder (for the t-SNE picture)."""
        owners, out = [], []
        for owner, h in self._patch_outputs(rows):
            owners.append(owner)
            out.append(h.float().cpu().numpy())
        return ClipEmbeddings(np.concatenate(out), np.concatenate(owners))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
