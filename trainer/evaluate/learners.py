"""The frozen-encoder learners of one round: kNN and the linear probe, both on patch
embeddings computed once (:class:`~trainer.evaluate.embed.ClipEmbeddings`) and read from
them a block or a minibatch at a time: no round copies them."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from trainer.evaluate.clips import ClipSet
from trainer.evaluate.config import KnnConfig, LinearConfig
from trainer.evaluate.embed import BLOCK, ClipEmbeddings, Rows
from trainer.evaluate.knn import knn_scores
from trainer.evaluate.protocol import Round
from trainer.objectives.supcon import classification_loss
from trainer.optim import warmup_cosine


def clip_average(owner: np.ndarray, patch_scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), C]: the mean score of each clip's patches (``owner`` [P] clip row of
    each of the ``patch_scores`` [P, C])."""
    position = np.full(int(max(owner.max(), rows.max())) + 1, -1)
    position[rows] = np.arange(len(rows))
    mine = position[owner] >= 0
    sums = np.zeros((len(rows), patch_scores.shape[1]))
    counts = np.zeros(len(rows))
    np.add.at(sums, position[owner[mine]], patch_scores[mine])
    np.add.at(counts, position[owner[mine]], 1)
    return sums / np.maximum(counts, 1)[:, None]


def _targets(clips: ClipSet, rows: np.ndarray) -> np.ndarray:
    """What a clip votes for / is trained on: class ids [n], or multi-hot [n, C]."""
    return clips.targets[rows] if clips.multilabel else clips.labels[rows]


class KnnLearner:
    """Cosine kNN against the round's training clips; nothing to train."""

    def __init__(self, clips: ClipSet, emb: ClipEmbeddings, rnd: Round, cfg: KnnConfig):
        self.clips, self.emb, self.rnd, self.cfg = clips, emb, rnd, cfg
        self.means = emb.clip_means() if cfg.aggregate == "mean" else None

    def train_epoch(self, epoch: int) -> float:
        return math.nan  # nothing to train: no loss to report

    def clip_scores(self, rows: np.ndarray) -> np.ndarray:
        c, train, cfg = self.clips.num_classes, self.rnd.train, self.cfg
        if self.means is not None:
            return knn_scores(Rows(self.means, train), _targets(self.clips, train), Rows(self.means, rows), c,
                              k=cfg.k, temperature=cfg.temperature)
        owner = self.emb.owner
        bank, queries = np.flatnonzero(np.isin(owner, train)), np.flatnonzero(np.isin(owner, rows))
        patch_scores = knn_scores(self.emb.unit_rows(bank), _targets(self.clips, owner[bank]),
                                  self.emb.unit_rows(queries), c, k=cfg.k, temperature=cfg.temperature)
        return clip_average(owner[queries], patch_scores, rows)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _standardisation(patches: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], std [D]) float32 of ``patches[rows]`` (float64 sums, a block at a time;
    unbiased std). A constant feature (std 0, or next to nothing against the largest) keeps
    std 1: the threshold is relative, as a random-init encoder in eval mode can give every
    feature a scale near 1e-13 (EfficientNet-B0), and those features are not constant."""
    dim = patches.shape[1]
    total, squares = np.zeros(dim), np.zeros(dim)
    for lo in range(0, len(rows), BLOCK):
        total += patches[rows[lo:lo + BLOCK]].sum(0, dtype=np.float64)
    mean = total / max(len(rows), 1)
    for lo in range(0, len(rows), BLOCK):
        squares += ((patches[rows[lo:lo + BLOCK]] - mean) ** 2).sum(0)
    std = np.sqrt(squares / max(len(rows) - 1, 1))
    std = np.where(std > 1e-6 * std.max(), std, 1.0)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


class LinearProbe:
    """A linear classifier on standardised patch embeddings (statistics of the round's
    training patches), trained with AdamW + cosine schedule; a clip's scores are the
    mean of its patches' softmax (sigmoid for multi-label) outputs."""

    def __init__(self, clips: ClipSet, emb: ClipEmbeddings, rnd: Round, cfg: LinearConfig, seed: int):
        self.clips, self.emb, self.cfg, self.seed = clips, emb, cfg, seed
        self.train_patches = np.flatnonzero(np.isin(emb.owner, rnd.train))
        self.mean, self.std = _standardisation(emb.patches, self.train_patches)
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(emb.patches.shape[1], clips.num_classes)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(self.train_patches) / cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, 0, cfg.epochs * steps))

    def train_epoch(self, epoch: int) -> float:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.train_patches)
        targets = torch.from_numpy(_targets(self.clips, self.emb.owner[order]))
        total = 0.0
        for lo in range(0, len(order), self.cfg.batch_size):
            logits = self.head(self._features(order[lo:lo + self.cfg.batch_size]))
            loss = classification_loss(logits, targets[lo:lo + self.cfg.batch_size])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item() * len(logits)
        return total / len(order)

    def _features(self, patches: np.ndarray) -> torch.Tensor:
        """[n, D] standardised embeddings of ``patches`` (indices), gathered per minibatch."""
        return (torch.from_numpy(self.emb.patches[patches]) - self.mean) / self.std

    @torch.no_grad()
    def clip_scores(self, rows: np.ndarray) -> np.ndarray:
        patches = np.flatnonzero(np.isin(self.emb.owner, rows))
        probs = np.zeros((len(patches), self.clips.num_classes), dtype=np.float32)
        for lo in range(0, len(patches), BLOCK):
            logits = self.head(self._features(patches[lo:lo + BLOCK]))
            probs[lo:lo + BLOCK] = (torch.sigmoid(logits) if self.clips.multilabel else F.softmax(logits, dim=1))
        return clip_average(self.emb.owner[patches], probs, rows)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
