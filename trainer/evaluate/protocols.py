"""The evaluation protocols, one entry each: whether it scores the frozen encoder's
embeddings (computed once, cached in the eval folder, shared by a sweep's trials, split
over ranks under ``audioclr launch ... eval``) or trains the encoder, how many epochs a
round runs, and the learner of one round. :class:`~trainer.evaluate.run.Evaluation`, the
sweeps and the online probe ask this table; a new protocol is one entry here, its
learner, and its config section (:mod:`trainer.evaluate.config`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.evaluate.config import PROTOCOLS, EvalConfig
from trainer.evaluate.finetune import FineTuner
from trainer.evaluate.learners import KnnLearner, LinearProbe


@dataclass(frozen=True)
class Protocol:
    """``frozen``: scores fixed embeddings of the encoder (else it trains the encoder);
    ``epochs(cfg)``: epochs per round; ``learner(evaluation, i, round)``: round ``i``'s
    learner, from what the :class:`~trainer.evaluate.run.Evaluation` holds."""

    name: str
    frozen: bool
    epochs: Callable[[EvalConfig], int]
    learner: Callable


def _knn(ev, i: int, rnd):
    return KnnLearner(ev.clips, ev.frozen, rnd, ev.cfg.knn)


def _linear(ev, i: int, rnd):
    return LinearProbe(ev.clips, ev.frozen, rnd, ev.cfg.linear, seed=ev.cfg.seed + i)


def _finetune(ev, i: int, rnd):
    return FineTuner(ev.clips, ev.encoder, ev.frontend, rnd, ev.cfg.finetune, patch=ev.patch, hop=ev.hop,
                     embed_batch=ev.cfg.embed_batch, seed=ev.cfg.seed + i, device=ev.device)


REGISTRY: dict[str, Protocol] = {
    "knn": Protocol("knn", frozen=True, epochs=lambda cfg: 1, learner=_knn),  # kNN trains nothing
    "linear": Protocol("linear", frozen=True, epochs=lambda cfg: cfg.linear.epochs, learner=_linear),
    "finetune": Protocol("finetune", frozen=False, epochs=lambda cfg: cfg.finetune.epochs, learner=_finetune),
}
assert tuple(REGISTRY) == PROTOCOLS, "trainer.evaluate.config.PROTOCOLS names the registry's protocols"

FROZEN = tuple(name for name, p in REGISTRY.items() if p.frozen)


def protocol(name: str) -> Protocol:
    return REGISTRY[name]
