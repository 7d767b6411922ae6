"""Gradient caching: batches larger than memory for in-batch objectives.

The batch is embedded in chunks without a graph; the loss is computed on the cached
embeddings and its gradient taken with respect to them; then each chunk is run again
with a graph and back-propagated with its slice of that gradient. The parameter
gradients equal those of the whole batch at once (up to float rounding), while the
activations held at any time are one chunk's (Gao et al., 2021). Batch-norm layers see
chunk statistics, not the whole batch's: with batch norm the two differ by that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


class GradCache:
    """One step of gradient caching.

    ``outputs()`` embeds ``views`` chunk by chunk without a graph and returns the whole
    batch's outputs as leaves that require grad; the caller computes its loss on them (and
    may check it) and calls ``backward(loss)``, which re-runs every chunk with a graph and
    back-propagates its slice of the loss's gradient. ``forward``: views [b, ...] -> dict
    of [b, ...] tensors; ``accumulating``: the engine's context in which a backward adds
    to the step's gradients without reducing them, used for every chunk but the last.
    """

    def __init__(self, forward: Callable[[torch.Tensor], dict], views: torch.Tensor, chunk: int,
                 accumulating: Callable[[], contextlib.AbstractContextManager]):
        self.forward, self.parts, self.accumulating = forward, views.split(chunk), accumulating
        self.whole: dict[str, torch.Tensor] = {}

    def outputs(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cached = [self.forward(p) for p in self.parts]
        self.whole = {k: torch.cat([c[k] for c in cached]).detach().requires_grad_() for k in cached[0]}
        return self.whole

    def backward(self, loss: torch.Tensor | None = None,
                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> None:
        """Re-run every chunk with a graph and back-propagate its slice of the gradient of
        ``loss`` w.r.t. the cached outputs; ``loss=None``: that gradient is already in the
        outputs' ``.grad`` (see :func:`blockwise_backward`). ``backward``: the engine's
        (DeepSpeed must run every backward of its model itself)."""
        if loss is not None:
            loss.backward()  # gradients w.r.t. the cached outputs (and the loss's own parameters)
        grads = {k: v.grad for k, v in self.whole.items()}
        start = 0
        for i, part in enumerate(self.parts):
            sync = contextlib.nullcontext() if i == len(self.parts) - 1 else self.accumulating()
            with sync:
                out = self.forward(part)
                surrogate = sum((out[k].float() * grads[k][start:start + len(part)].float()).sum()
                                for k in out if grads[k] is not None)
                backward(surrogate)
            start += len(part)


def blockwise_backward(inputs: list[torch.Tensor], part: Callable[..., torch.Tensor], num_parts: int) -> torch.Tensor:
    """Back-propagate a loss that is a sum of ``num_parts`` parts, one part at a time.

    ``part(*leaves, i)`` computes part i from detached copies of ``inputs``; each part's
    graph is freed after its backward, so an O(N^2) loss (N x N logits) holds one block
    of rows at a time. The summed gradients then flow once through ``inputs``' own graph
    (a gather across ranks, say). Returns the loss (detached).
    """
    leaves = [x.detach().requires_grad_() for x in inputs]
    total = torch.zeros((), device=inputs[0].device)
    for i in range(num_parts):
        value = part(*leaves, i)
        value.backward()
        total = total + value.detach()
    torch.autograd.backward(inputs, [leaf.grad for leaf in leaves])
    return total
