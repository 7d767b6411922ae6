"""Objective registry: ``objective.name`` -> a class holding what the loss needs.

An objective exposes ``loss(z, batch) -> scalar`` and ``state_dict`` /
``load_state_dict`` (for queues and memory banks); losses themselves are pure
functions in the sibling modules.
"""

from __future__ import annotations

import torch

from trainer import distributed
from trainer.objectives.ntxent import nt_xent


class SimCLR:
    """NT-Xent over the embeddings of all ranks (gathered with gradient)."""

    def __init__(self, temperature: float, rank: int = 0):
        self.temperature = temperature
        self.rank = rank

    def loss(self, z: torch.Tensor, batch=None) -> torch.Tensor:
        return nt_xent(z, distributed.gather_with_grad(z), self.rank, temperature=self.temperature)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


OBJECTIVES = {"simclr": SimCLR}


def build_objective(name: str, temperature: float, rank: int):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}': choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](temperature=temperature, rank=rank)
