"""The papers' evaluation protocols: rounds of train / val / test clips, the metrics of a
round, and a runner that trains every round's learner in lockstep, epoch by epoch (so a
Ray Tune trial can report the mean over folds after each epoch and stop early).

- ``folds``: leave one fold out (ESC-50: 5 rounds, US8K: 10); every labelled clip is
  tested exactly once.
- ``split``: the shards' fixed train / (val /) test split (GTZAN, FSD50K).
- ``random``: one seeded stratified split, for shards with neither.

A round's validation clips come from the shards' ``val`` split when there is one, else
(``val_fraction`` > 0) from clips that are not trained on: under ``folds`` the next fold
whole (round k tests fold k, validates on fold k+1, trains on the rest), since folds are
groups (a kit, an instrument, a source recording) and a random share of the training
clips would share its group with training and rank trials by how well they memorise it;
elsewhere, and with only two folds, a seeded stratified ``val_fraction`` of the training
clips. Model
selection (Ray Tune, early stopping) reads validation metrics only; test metrics are
those of the last epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from trainer.evaluate.clips import ClipSet
from trainer.evaluate.metrics import (
    class_averaged_accuracy,
    macro_f1,
    multilabel_metrics,
    per_class_table,
    weighted_average_precision,
)

log = logging.getLogger(__name__)
SINGLE_LABEL_METRICS = ("class_averaged_accuracy", "macro_f1", "wAP")
MULTI_LABEL_METRICS = ("mAP", "auc", "d_prime")


@dataclass
class Round:
    """Row indices into the clip set."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def labelled(clips: ClipSet) -> np.ndarray:
    return clips.targets.sum(axis=1) > 0 if clips.multilabel else clips.labels >= 0


def stratified_take(rows: np.ndarray, strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A ``fraction`` of ``rows`` drawn class by class (at least one row of each class
    with two or more rows), sorted."""
    taken = []
    for c in np.unique(strata[rows]):
        members = rows[strata[rows] == c].copy()
        rng.shuffle(members)
        n = int(round(len(members) * fraction))
        taken.append(members[:max(n, 1 if len(members) > 1 else 0)])
    return np.sort(np.concatenate(taken)) if taken else rows[:0]


def _carve_val(clips: ClipSet, train: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction <= 0:
        return train, train[:0]
    val = stratified_take(train, clips.labels, val_fraction, np.random.default_rng(seed))
    return np.setdiff1d(train, val), val


def make_rounds(clips: ClipSet, how: str = "auto", *, test_fraction: float = 0.2, val_fraction: float = 0.0,
                seed: int = 0, max_rounds: int = 0, only_folds: Sequence[int] = ()) -> list[Round]:
    """The rounds of protocol ``how`` (auto: folds if every labelled clip has one and
    there are two or more, else the split if it has train and test clips, else random);
    with folds, ``only_folds`` keeps the rounds that test those fold numbers."""
    ok = labelled(clips)
    rows = np.flatnonzero(ok)
    if not len(rows):
        raise ValueError("no clip carries a label of the vocabulary: nothing to evaluate")
    folds, splits = clips.folds, clips.splits
    has_folds = bool((folds[rows] > 0).all()) and len(np.unique(folds[rows])) > 1
    has_split = {"train", "test"} <= set(splits[rows])
    if how == "auto":
        how = "folds" if has_folds else "split" if has_split else "random"
    rounds = []
    if how == "folds":
        if not has_folds:
            raise ValueError("eval.split=folds, but the shards' clips carry no folds")
        ids = np.unique(folds[rows])
        unknown = sorted(set(only_folds) - set(ids.tolist()))
        if unknown:
            raise ValueError(f"eval.folds {unknown}: the shards' folds are {ids.tolist()}")
        for i, f in enumerate(ids):
            if only_folds and f not in only_folds:
                continue
            rest = rows[folds[rows] != f]
            if val_fraction > 0 and len(ids) > 2:  # a whole fold: no group on both sides
                held = ids[(i + 1) % len(ids)]
                train, val = rest[folds[rest] != held], rest[folds[rest] == held]
            else:
                train, val = _carve_val(clips, rest, val_fraction, seed + i)
            rounds.append(Round(f"fold{f}", train, val, rows[folds[rows] == f]))
    elif how == "split":
        if not has_split:
            raise ValueError("eval.split=split, but the shards have no 'train' and 'test' clips")
        train, val = rows[splits[rows] == "train"], rows[splits[rows] == "val"]
        if not len(val):
            train, val = _carve_val(clips, train, val_fraction, seed)
        rounds.append(Round("test", train, val, rows[splits[rows] == "test"]))
    else:
        test = stratified_take(rows, clips.labels, test_fraction, np.random.default_rng(seed))
        train, val = _carve_val(clips, np.setdiff1d(rows, test), val_fraction, seed + 1)
        rounds.append(Round("random", train, val, test))
    if only_folds and how != "folds":
        raise ValueError(f"eval.folds needs rounds by folds, not eval.split={how}")
    return rounds[:max_rounds] if max_rounds > 0 else rounds


def score(clips: ClipSet, rows: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The protocol's metrics of clip scores [len(rows), C] (probabilities or votes)."""
    if clips.multilabel:
        return multilabel_metrics(clips.targets[rows], scores)
    labels, predictions = clips.labels[rows], scores.argmax(axis=1)
    return {"class_averaged_accuracy": class_averaged_accuracy(labels, predictions),
            "macro_f1": macro_f1(labels, predictions),
            "wAP": weighted_average_precision(labels, scores)}


def primary_metric(clips: ClipSet) -> str:
    return "mAP" if clips.multilabel else "class_averaged_accuracy"


class Learner(Protocol):
    """What one round trains: an epoch of training, clip scores, a resumable state."""

    def train_epoch(self, epoch: int) -> float: ...
    def clip_scores(self, rows: np.ndarray) -> np.ndarray: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _mean_std(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    return {"mean": float(np.mean(finite)) if finite else math.nan,
            "std": float(np.std(finite)) if finite else math.nan}


class RoundRunner:
    """Trains the learners of all rounds one epoch at a time and scores each on its val
    and test clips after every epoch."""

    def __init__(self, clips: ClipSet, rounds: list[Round], make_learner: Callable[[int, Round], Learner],
                 epochs: int):
        self.clips, self.rounds, self.epochs = clips, rounds, epochs
        self.learners = [make_learner(i, r) for i, r in enumerate(rounds)]
        self.history: dict[str, list[dict]] = {r.name: [] for r in rounds}
        self.test_scores: dict[str, np.ndarray] = {}
        self.epoch = 0

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs

    def step(self) -> dict:
        """One epoch of every round -> {"epoch", "train_loss", "val_<m>", "test_<m>"} as
        means over the rounds (val keys only where rounds have validation clips)."""
        self.epoch += 1
        for rnd, learner in zip(self.rounds, self.learners):
            row = {"epoch": self.epoch}
            loss = float(learner.train_epoch(self.epoch - 1))
            if math.isfinite(loss):  # kNN trains nothing
                row["train_loss"] = loss
            if len(rnd.val):
                row.update({f"val_{k}": v for k, v in score(self.clips, rnd.val, learner.clip_scores(rnd.val)).items()})
            self.test_scores[rnd.name] = learner.clip_scores(rnd.test)
            row.update({f"test_{k}": v for k, v in score(self.clips, rnd.test, self.test_scores[rnd.name]).items()})
            self.history[rnd.name].append(row)
            log.info("%s epoch %d/%d: %s", rnd.name, self.epoch, self.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
        keys = [k for k in self.history[self.rounds[0].name][-1] if k != "epoch"]
        return {"epoch": self.epoch,
                **{k: _mean_std([h[-1].get(k, math.nan) for h in self.history.values()])["mean"] for k in keys}}

    def result(self) -> dict:
        """Test metrics of the last epoch per round, their mean and std, and (single-label)
        the per-class table and the predictions of every tested clip."""
        rounds = {r.name: {k[5:]: v for k, v in self.history[r.name][-1].items() if k.startswith("test_")}
                  for r in self.rounds}
        names = MULTI_LABEL_METRICS if self.clips.multilabel else SINGLE_LABEL_METRICS
        out = {"metrics": {m: _mean_std([r[m] for r in rounds.values()]) for m in names}, "rounds": rounds}
        tested = np.concatenate([r.test for r in self.rounds])
        out["tested_rows"] = tested
        if not self.clips.multilabel:
            predictions = np.concatenate([self.test_scores[r.name].argmax(axis=1) for r in self.rounds])
            table = per_class_table(self.clips.labels[tested], predictions, np.arange(self.clips.num_classes))
            out["per_class"] = {self.clips.class_names[c]: row for c, row in table.items()}
            out["predictions"] = predictions
        return out

    def state_dict(self) -> dict:
        # tensors and plain floats only: the state is read back with weights_only=True
        history = {name: [{k: float(v) for k, v in row.items()} for row in rows]
                   for name, rows in self.history.items()}
        scores = {name: torch.from_numpy(np.asarray(v)) for name, v in self.test_scores.items()}
        return {"epoch": self.epoch, "history": history, "test_scores": scores,
                "learners": [learner.state_dict() for learner in self.learners]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.history = {name: [{k: (int(v) if k == "epoch" else v) for k, v in row.items()} for row in rows]
                        for name, rows in state["history"].items()}
        self.test_scores = {name: v.numpy() for name, v in state["test_scores"].items()}
        for learner, s in zip(self.learners, state["learners"]):
            learner.load_state_dict(s)
