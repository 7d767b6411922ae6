"""Objective registry: ``objective.name`` -> a class holding what its loss needs.

An objective builds the model it trains (``build_model``: the encoder, the head it wants
and its own trainable parts, COLA's bilinear W or SoundCLR's classifier, all in one
module), says which views go through it (``model_views``), holds its state (MoCo's key
encoder and queue, NPID's memory bank) and exposes ``loss(out, batch)``,
``after_step(model, step)``, ``state_dict`` / ``load_state_dict`` and, for state sharded over
ranks, ``slice_state`` (each rank saves its own slice).
The losses themselves are pure functions in the sibling modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dataio.schema import check
from trainer.models.heads import ContrastiveModel, LinearProjection, ObjectiveParts, ProjectionHead, ProjectionHeads
from trainer.objectives.cola import ColaHead, ColaParts, cola_projected_loss
from trainer.objectives.moco import MOMENTUM_SCHEDULES, ShardedQueue, moco_logits_loss, momentum_update
from trainer.objectives.npid import ShardedMemoryBank, npid_exact_loss, npid_nce_loss
from trainer.objectives.ntxent import nt_xent
from trainer.objectives.supcon import ClassifierParts, classification_loss, hybrid_loss, supcon_loss
from trainer.parallel import distributed
from trainer.parallel.gradcache import blockwise_backward

# name -> the slice records every rank of a checkpoint saved under it (see slice_state)
SliceReader = Callable[[str], Iterable[dict]]


@dataclass
class ObjectiveContext:
    """What objectives may need to know about the run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    num_clips: int = 0
    num_classes: int = 0
    total_steps: int = 1
    seed: int = 0
    num_views: int = 2


class _Base:
    """Defaults for the parts most objectives do not need."""

    reads_model = False  # after_step reads the trained weights (an engine gathers them first)
    batch_negatives = True  # the negatives are the batch's other clips (not a queue or a bank)
    uses_labels = False  # the loss reads the clips' labels (a score on them needs encoders that never saw them)
    reads: tuple[str, ...] = ()  # the objective.* keys it reads (another one set is refused by name)

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse (ConfigError naming the key) what this objective cannot train with the
        pretraining config ``cfg``."""
        check(cfg.data.batch_size >= 2 or not cls.batch_negatives, "data.batch_size",
              f"objective {cfg.objective.name} takes its negatives from the other clips of the batch: "
              "a batch of 1 has none (the loss would be 0); use 2 or more")

    def __init__(self, cfg, model_cfg, ctx: ObjectiveContext):
        self.cfg, self.model_cfg, self.ctx = cfg, model_cfg, ctx

    def build_model(self, encoder: nn.Module) -> ContrastiveModel:
        """The module the engine trains: ``encoder``, this objective's head and parts."""
        dim = encoder.embedding_dim
        return ContrastiveModel(encoder, self.make_head(dim), self.make_parts(dim))

    def make_head(self, embedding_dim: int) -> nn.Module:
        return ProjectionHead(embedding_dim, self.model_cfg.proj_hidden, self.model_cfg.proj_dim)

    def make_parts(self, embedding_dim: int) -> ObjectiveParts:
        """Trainable modules of the objective's own, applied inside the model's forward."""
        return ObjectiveParts()

    def attach(self, model: nn.Module) -> None:
        """Called once the model exists (MoCo copies it as its key encoder)."""

    def model_views(self, views: torch.Tensor) -> torch.Tensor:
        return views

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def loss_backward(self, out: dict, batch, block: int) -> torch.Tensor:
        """Gradient caching's first stage: back-propagate the loss to the cached ``out``
        with at most ``block`` clips' rows of
        logits at a time where the loss allows; returns the loss (detached)."""
        loss = self.loss(out, batch)
        if torch.isfinite(loss):
            loss.backward()
        return loss.detach()

    def state_dict(self) -> dict:
        """What every rank shares (saved once)."""
        return {}

    def slice_state(self) -> dict:
        """This rank's slices of state sharded over ranks, by name (saved by each rank)."""
        return {}

    def load_state_dict(self, state: dict, slices: SliceReader = lambda name: ()) -> None:
        """``state`` as :meth:`state_dict` saved it; ``slices(name)``: the slice records every
        rank saved under ``name`` (at any world size)."""


class SimCLR(_Base):
    """NT-Xent over the embeddings of all ranks (gathered with gradient)."""

    reads = ("temperature",)

    def loss(self, out: dict, batch) -> torch.Tensor:
        z = out["z"]
        return nt_xent(z, distributed.gather_with_grad(z), self.ctx.rank, temperature=self.cfg.temperature)

    def loss_backward(self, out: dict, batch, block: int) -> torch.Tensor:
        z = out["z"]
        rows = z.shape[0] * z.shape[1]
        step = max(1, block) * z.shape[1]

        def part(local, everyone, i):
            return nt_xent(local, everyone, self.ctx.rank, temperature=self.cfg.temperature,
                           rows=slice(i * step, (i + 1) * step))
        return blockwise_backward([z, distributed.gather_with_grad(z)], part, -(-rows // step))


class LooC(_Base):
    """Leave-one-out contrastive learning (Xiao et al., ICLR 2021), NT-Xent in every space.

    V = data.num_views views of a clip, V - 1 projection heads on one encoder. Head 0 is
    the invariant space: all V views of a clip are positives of one another (multi-positive
    NT-Xent). Head k (k >= 1) is the space that keeps what view k shares with view 0: there
    only views 0 and k are positives. The chain says what they share: an op entry with
    ``per: clip`` and ``views: [0, k]`` draws the same parameters for both (the same
    frequency crop, say), so head k need not be invariant to it, and the encoder, which
    feeds every head, keeps that information instead of discarding it."""

    reads = ("temperature", "looc_invariant")

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        check(cfg.data.num_views >= 3, "data.num_views",
              f"objective looc needs 3 or more views (the invariant pair, then one view per left-out "
              f"augmentation), got {cfg.data.num_views}")

    def make_head(self, embedding_dim: int) -> nn.Module:
        return ProjectionHeads(self.spaces, embedding_dim, self.model_cfg.proj_hidden, self.model_cfg.proj_dim)

    @property
    def spaces(self) -> int:
        return self.ctx.num_views - 1

    def loss(self, out: dict, batch) -> torch.Tensor:
        z = out["z"]
        everyone = distributed.gather_with_grad(z)
        d, tau, rank = self.model_cfg.proj_dim, self.cfg.temperature, self.ctx.rank
        views = slice(None) if self.cfg.looc_invariant == "all" else slice(0, 2)
        losses = [nt_xent(z[:, views, :d], everyone[:, views, :d], rank, temperature=tau)]
        for k in range(1, self.spaces):  # head k: views 0 and k + 1, its own d columns
            pair, cols = [0, k + 1], slice(k * d, (k + 1) * d)
            losses.append(nt_xent(z[:, pair, cols], everyone[:, pair, cols], rank, temperature=tau))
        return torch.stack(losses).mean()


class Cola(_Base):
    """COLA: bilinear similarity of two segments, cross-entropy over the batch's candidates."""

    reads = ("cola_dim", "global_negatives")  # no temperature: the bilinear score is its own scale

    def make_parts(self, embedding_dim: int) -> ObjectiveParts:
        return ColaParts(self.cfg.cola_dim)

    def make_head(self, embedding_dim: int) -> nn.Module:
        return ColaHead(embedding_dim, self.cfg.cola_dim)

    def loss(self, out: dict, batch) -> torch.Tensor:
        z = out["z"]
        candidates = distributed.gather_with_grad(z[:, 1]) if self.cfg.global_negatives else z[:, 1]
        rank = self.ctx.rank if self.cfg.global_negatives else 0
        return cola_projected_loss(out["aw"], candidates, rank)


class SupCon(_Base):
    """Supervised contrastive loss over all ranks (positives: shared labels)."""

    uses_labels = True
    reads = ("temperature", "overlap_weighting", "supcon_dim")

    def make_head(self, embedding_dim: int) -> nn.Module:
        return LinearProjection(embedding_dim, self.cfg.supcon_dim)

    def supcon(self, out: dict, batch) -> torch.Tensor:
        z = out["z"]
        return supcon_loss(z, distributed.gather_with_grad(z), batch.labels,
                           distributed.gather_no_grad(batch.labels), self.ctx.rank,
                           temperature=self.cfg.temperature, overlap_weighting=self.cfg.overlap_weighting)

    def loss(self, out: dict, batch) -> torch.Tensor:
        return self.supcon(out, batch)


class Hybrid(SupCon):
    """SoundCLR: alpha * SupCon + (1 - alpha) * cross-entropy of a linear classifier on
    the L2-normalised encoder embedding of every view."""

    reads = (*SupCon.reads, "alpha")

    def make_parts(self, embedding_dim: int) -> ObjectiveParts:
        if self.ctx.num_classes < 2:
            raise ValueError("objective hybrid needs labelled shards (a vocabulary of >= 2 labels)")
        return ClassifierParts(embedding_dim, self.ctx.num_classes)

    def loss(self, out: dict, batch) -> torch.Tensor:
        logits = out["logits"]
        labels = batch.labels.repeat_interleave(logits.shape[1], dim=0)
        logits = logits.reshape(-1, logits.shape[-1])
        return hybrid_loss(self.supcon(out, batch), classification_loss(logits, labels), self.cfg.alpha)


class MoCo(_Base):
    """MoCo v2: queries from the trained model, keys from its momentum copy, negatives
    from a queue sharded across ranks. Batch norm statistics are global (model.global_bn),
    which keeps a rank's batch statistics from leaking the positive."""

    reads_model = True
    batch_negatives = False
    reads = ("temperature", "queue_size", "momentum", "momentum_schedule")

    def __init__(self, cfg, model_cfg, ctx):
        super().__init__(cfg, model_cfg, ctx)
        self.queue = ShardedQueue(cfg.queue_size, model_cfg.proj_dim, ctx.rank, ctx.world_size,
                                  ctx.device, seed=ctx.seed)
        self.key_model: nn.Module | None = None
        self._keys: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        self.key_model = copy.deepcopy(model).to(self.ctx.device)
        for p in self.key_model.parameters():
            p.requires_grad_(False)

    def model_views(self, views: torch.Tensor) -> torch.Tensor:
        return views[:, :1]

    @torch.no_grad()
    def keys(self, views: torch.Tensor) -> torch.Tensor:
        self.key_model.train()
        return self.key_model(views[:, 1:2])["z"][:, 0].float()

    def loss(self, out: dict, batch) -> torch.Tensor:
        self._keys = self.keys(batch.views)
        return moco_logits_loss(out["z"][:, 0], self._keys, self.queue.shard, self.ctx.rank,
                                temperature=self.cfg.temperature)

    def after_step(self, model: nn.Module, step: int) -> None:
        m = MOMENTUM_SCHEDULES[self.cfg.momentum_schedule](step, self.ctx.total_steps, self.cfg.momentum)
        momentum_update(self.key_model, model, m)
        if self._keys is not None:
            self.queue.enqueue(self._keys)
            self._keys = None

    def state_dict(self) -> dict:
        return {"queue": self.queue.state_dict(), "key_model": self.key_model.state_dict()}

    def slice_state(self) -> dict:
        return {"queue": self.queue.slice_state()}

    def load_state_dict(self, state: dict, slices: SliceReader = lambda name: ()) -> None:
        self.queue.load_state_dict(state["queue"], slices("queue"))
        self.key_model.load_state_dict(state["key_model"])


class NPID(_Base):
    """Instance discrimination against a memory bank of one row per clip, sharded across
    ranks; NCE with m noise rows, or the exact softmax (objective.nce_noise=0)."""

    batch_negatives = False
    reads = ("temperature", "nce_noise", "bank_momentum")

    def __init__(self, cfg, model_cfg, ctx):
        super().__init__(cfg, model_cfg, ctx)
        self.bank = ShardedMemoryBank(ctx.num_clips, model_cfg.proj_dim, ctx.rank, ctx.world_size,
                                      cfg.bank_momentum, ctx.device, seed=ctx.seed)
        self.noise = torch.Generator(device="cpu").manual_seed(ctx.seed + 17)
        self._pending: tuple | None = None

    def make_head(self, embedding_dim: int) -> nn.Module:
        return LinearProjection(embedding_dim, self.model_cfg.proj_dim)

    def model_views(self, views: torch.Tensor) -> torch.Tensor:
        return views[:, :1]

    def loss(self, out: dict, batch) -> torch.Tensor:
        z = out["z"][:, 0].float()
        z_all = distributed.gather_with_grad(z)
        idx_all = distributed.gather_no_grad(batch.indices)
        self._pending = (idx_all, z_all.detach())
        if self.cfg.nce_noise > 0:
            return npid_nce_loss(z, z_all, idx_all, self.bank, self.ctx.rank, temperature=self.cfg.temperature,
                                 num_noise=self.cfg.nce_noise, generator=self.noise)
        return npid_exact_loss(z, z_all, idx_all, self.bank, self.ctx.rank, temperature=self.cfg.temperature)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self._pending is not None:
            self.bank.update(*self._pending)
            self._pending = None

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict(), "noise": self.noise.get_state()}

    def slice_state(self) -> dict:
        return {"bank": self.bank.slice_state()}

    def load_state_dict(self, state: dict, slices: SliceReader = lambda name: ()) -> None:
        self.bank.load_state_dict(state["bank"], slices("bank"))
        self.noise.set_state(state["noise"])


OBJECTIVES = {"simclr": SimCLR, "looc": LooC, "moco": MoCo, "npid": NPID, "cola": Cola, "supcon": SupCon,
              "hybrid": Hybrid}


def build_objective(cfg, model_cfg, ctx: ObjectiveContext):
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{cfg.name}': choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg, model_cfg, ctx)
