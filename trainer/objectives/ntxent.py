"""NT-Xent (SimCLR's normalised temperature-scaled cross-entropy) over global negatives."""

from __future__ import annotations

import torch


def nt_xent(local: torch.Tensor, everyone: torch.Tensor, rank: int, *, temperature: float,
            rows: slice | None = None) -> torch.Tensor:
    """Mean NT-Xent of this rank's anchors against the whole global batch.

    local: [B, V, D] L2-normalised embeddings of this rank's clips (V >= 2 views);
    everyone: [W*B, V, D] the same for all ranks in rank order (``local`` is rows
    ``rank*B .. rank*B+B-1``); returns a float32 scalar: for every anchor view and each
    of its V-1 positives (the clip's other views), ``-log softmax`` of the positive
    among all W*B*V - 1 other views, averaged over anchors and positives.
    Averaging this over ranks gives the loss of one process holding the global batch.
    ``rows`` (a slice of the V*B view-major anchors) gives that block's share of the loss,
    so the blocks' values add up to the loss while each holds only its rows of logits.
    """
    with torch.autocast(local.device.type, enabled=False):  # float32 logits under autocast too
        return _nt_xent(local, everyone, rank, temperature, rows or slice(None))


def _nt_xent(local: torch.Tensor, everyone: torch.Tensor, rank: int, temperature: float,
             rows: slice) -> torch.Tensor:
    b, v, _ = local.shape
    anchors = local.float().transpose(0, 1).reshape(v * b, -1)[rows]    # [A, D] view-major
    cands = everyone.float().transpose(0, 1).reshape(-1, everyone.shape[-1])  # [V*W*B, D]
    total = everyone.shape[0]
    logits = anchors @ cands.T / temperature                            # [V*B, V*W*B]
    view = torch.arange(v, device=local.device).repeat_interleave(b)[rows]
    clip = (torch.arange(b, device=local.device).repeat(v) + rank * b)[rows]
    self_col = view * total + clip
    logits = logits.scatter(1, self_col[:, None], float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos_cols = torch.arange(v, device=local.device)[None, :] * total + clip[:, None]  # [V*B, V]
    pos_mask = pos_cols != self_col[:, None]
    pos_lp = log_prob.gather(1, pos_cols).masked_fill(~pos_mask, 0.0)  # drop the -inf self terms
    return -pos_lp.sum() / (v * b * (v - 1))  # every anchor has V-1 positives
