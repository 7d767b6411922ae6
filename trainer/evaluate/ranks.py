"""The embedding pass split over ranks (``audioclr launch ... eval``): each rank embeds a
contiguous share of the clips, reading only the shards that hold it, and the shares are
gathered in clip order, so every rank ends with the array one process computes."""

from __future__ import annotations

import numpy as np
import torch

from dataio.frontend import FrontendConfig
from trainer.evaluate.clips import ClipSet
from trainer.evaluate.embed import ClipEmbeddings, embed_clips
from trainer.parallel import distributed


def rank_rows(num_clips: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous rows of rank ``rank``'s share (sizes differ by at most one)."""
    return np.arange(num_clips * rank // world_size, num_clips * (rank + 1) // world_size)


def embed_over_ranks(encoder: torch.nn.Module, frontend: FrontendConfig, clips: ClipSet,
                     info: distributed.DistInfo, **embed_kw) -> ClipEmbeddings:
    """:func:`~trainer.evaluate.embed.embed_clips` of every clip, this rank embedding its
    :func:`rank_rows`; one gather (of the share, or of the error a rank hit, so that no rank
    waits for a share that never comes) gives every rank the whole, in clip order."""
    if info.world_size == 1:
        return embed_clips(encoder, frontend, clips, **embed_kw)
    try:
        mine = embed_clips(encoder, frontend, clips, rows=rank_rows(len(clips), info.rank, info.world_size),
                           **embed_kw)
        share, error = (mine.patches, mine.owner), ""
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank, after the gather
        share, error = None, f"{type(err).__name__}: {err}"
    shares = distributed.gather_objects((share, error))
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(shares) if e]
    if errors:
        raise ValueError("embedding the clips failed on " + "; ".join(errors))
    return ClipEmbeddings(np.concatenate([s[0] for s, _ in shares]), np.concatenate([s[1] for s, _ in shares]))
