"""Typed settings of ``audioclr eval`` (the ``eval:`` section; ``eval.a.b=v`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass

from dataio.schema import check, option

PROTOCOLS = ("knn", "linear", "finetune")


@dataclass
class KnnConfig:
    k: int = option(200, "neighbours (capped by the number of training clips)")
    temperature: float = option(0.07, "temperature of the exp(similarity / T) vote weights")
    aggregate: str = option("mean", "clip = mean of patch embeddings, or vote of its patches", ("mean", "vote"))

    def __post_init__(self) -> None:
        check(self.k > 0, "k", "must be positive")
        check(self.temperature > 0, "temperature", "must be positive")


@dataclass
class LinearConfig:
    epochs: int = option(30, "passes over the training patches")
    lr: float = option(1e-2, "AdamW learning rate (cosine to 0)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    batch_size: int = option(256, "patches per step")

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.lr > 0, "lr", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")


@dataclass
class FinetuneConfig:
    epochs: int = option(20, "passes over the training clips (one random crop of each per pass)")
    optimizer: str = option("adamw", "optimizer of encoder and head", ("adamw", "sgd"))
    lr: float = option(1e-3, "peak learning rate (linear warm-up, then cosine to 0)")
    momentum: float = option(0.9, "SGD momentum / AdamW beta1")
    weight_decay: float = option(1e-4, "weight decay of weights (not of biases and norms)")
    warmup_epochs: float = option(1.0, "linear warm-up, in epochs")
    batch_size: int = option(32, "clips per step")
    loss: str = option("ce", "ce: cross-entropy (BCE for multi-label); hybrid: SoundCLR's "
                       "alpha * SupCon + (1 - alpha) * CE", ("ce", "hybrid"))
    alpha: float = option(0.5, "hybrid: weight of the supervised contrastive term")
    temperature: float = option(0.1, "hybrid: temperature of the supervised contrastive term")
    proj_dim: int = option(64, "hybrid: size of the linear projection SupCon works on")
    gain_db: float = option(0.0, "random gain of each training crop, +- dB")
    shuffle_buffer: int = option(512, "training crops held in the shuffle buffer between the shards, read "
                                 "in a seeded order, and the batches (int16: 16 MB of 1-s crops at 16 kHz)")

    def __post_init__(self) -> None:
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.lr > 0, "lr", "must be positive")
        check(self.batch_size > 1, "batch_size", "must be at least 2 (batch norm trains on it)")
        check(0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1]")
        check(self.temperature > 0, "temperature", "must be positive")
        check(self.proj_dim > 0, "proj_dim", "must be positive")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.gain_db >= 0, "gain_db", "must be >= 0")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")


@dataclass
class EvalConfig:
    split: str = option("auto", "auto: folds if the shards have them, else their train/test split, "
                        "else a seeded random split", ("auto", "folds", "split", "random"))
    test_fraction: float = option(0.2, "test share of the seeded random split")
    val_fraction: float = option(0.0, "> 0: validation clips, when the shards have no 'val' split (Ray Tune "
                                 "selects on them): with folds the next fold whole (folds are groups), "
                                 "else this share of each round's training clips")
    max_rounds: int = option(0, "evaluate only the first N rounds (folds); 0 = all")
    folds: list[int] = option([], "with folds: score only the rounds that test these fold numbers (an encoder "
                              "pretrained with labels on the other folds); [] = all")
    seed: int = option(0, "seed of the splits, of the training order and of random-init encoders")
    patch_seconds: float = option(0.0, "patch / crop length, s; 0 = the encoder's training view length")
    hop_seconds: float = option(0.0, "hop between a clip's patches, s; 0 = half a patch")
    embed_batch: int = option(128, "patches per encoder call when embedding")
    device: str = option("auto", "auto = cuda when available", ("auto", "cpu", "cuda"))
    pictures: bool = option(True, "write learning curves, confusion matrix and t-SNE PNGs + summary.md")
    knn: KnnConfig = option(KnnConfig(), "kNN protocol")
    linear: LinearConfig = option(LinearConfig(), "linear probe on frozen patch embeddings")
    finetune: FinetuneConfig = option(FinetuneConfig(), "fine-tuning of the whole encoder with a new head")

    def __post_init__(self) -> None:
        check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        check(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        check(self.max_rounds >= 0, "max_rounds", "must be >= 0")
        check(all(isinstance(f, int) and f > 0 for f in self.folds), "folds", "must be positive fold numbers")
        check(self.patch_seconds >= 0, "patch_seconds", "must be >= 0")
        check(self.hop_seconds >= 0, "hop_seconds", "must be >= 0")
        check(self.embed_batch > 0, "embed_batch", "must be positive")


@dataclass
class OnlineConfig:
    """The online probe of a pretraining run (its ``eval:`` section)."""

    online: str = option("", "labelled shard folder with folds scored during training with the current "
                         "encoder, as `audioclr eval` scores an exported one ('' = off)")
    every: int = option(25, "epochs between online scores (one is always taken at the end)")
    linear: bool = option(False, "also the linear probe (scored on rank 0; kNN alone is cheaper)")
    max_rounds: int = option(0, "score only the first N folds; 0 = all")
    patch_seconds: float = option(0.0, "patch length, s; 0 = the training view length (as audioclr eval)")

    def __post_init__(self) -> None:
        check(self.every > 0, "every", "must be positive")
        check(self.patch_seconds >= 0, "patch_seconds", "must be >= 0")
        check(self.max_rounds >= 0, "max_rounds", "must be >= 0")


@dataclass
class EvalRoot:
    eval: EvalConfig = option(EvalConfig(), "evaluation settings")
