"""The augmentation stage: waveform ops -> log-mel -> log-mel ops, one batched call per batch.

Both data back ends hand their batches to one :class:`Augmenter`; it runs wherever the
log-mel is computed (the GPU; on a CPU training device, the loader workers). The back
ends cut ``input_samples`` samples per view (more than the view when an op consumes
some: a speed-up, a time stretch), and the chain plans every op's input and output size
from the end, so each op sees exactly what it needs and the output is always the view's
``[C, F, T]``.

Draws are keyed (see :mod:`dataio.augment.keyed`): an op's parameters for a view from
(seed, epoch, clip index, draw, view, op label); a batch op's choices (mixing partners)
from (seed, epoch, step, rank, op label).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from dataio.augment.base import BuildContext, OpConfig, Rows
from dataio.augment.keyed import generator, label_salt, row_keys, scalar_key, uniforms
from dataio.formats.base import ARRIVALS, DB_FRAMES, MELS, WAVES
from dataio.frontend import FrontendConfig, LogMel


@dataclass
class BatchIds:
    """Who the rows of a batch are: ``indices`` [B] dataset positions of the clips,
    ``draws`` [B] which draw of that clip this is (pair number; several view sets of
    one clip differ), and where the batch sits: epoch, step, rank."""

    indices: torch.Tensor
    draws: torch.Tensor
    epoch: int
    step: int
    rank: int


class Augmenter:
    """The configured chain for one run; ``input_samples`` per view go in, log-mel views
    ``[B, V, C, F, T]`` come out."""

    def __init__(self, ops: list[OpConfig], frontend: FrontendConfig, view_samples: int, *,
                 num_views: int, pairs_per_clip: int, seed: int):
        ops = copy.deepcopy(ops)  # planning writes sizes and tables into the ops
        self.frontend, self.view_samples, self.seed = frontend, view_samples, seed
        self.num_views, self.pairs = num_views, pairs_per_clip
        self.wave_ops = [op for op in ops if op.domain == "wave"]
        self.mel_ops = [op for op in ops if op.domain == "mel"]
        self.frames = frontend.num_frames(view_samples)
        need = self.frames
        for op in reversed(self.mel_ops):
            op.out_size = need
            need = op.needed(need)
        self.mel_frames_in = need
        need = view_samples + (self.mel_frames_in - self.frames) * frontend.hop_length
        for op in reversed(self.wave_ops):
            op.out_size = need
            need = op.needed(need)
        self.input_samples = need
        ctx = BuildContext(frontend=frontend, seed=seed, max_samples=self.input_samples)
        for op in ops:
            op.salt = label_salt(op.label)
            op.prepare(ctx)
        self.logmel = LogMel(dataclasses.replace(frontend, channels=1))

    @property
    def has_wave_ops(self) -> bool:
        return bool(self.wave_ops)

    def __bool__(self) -> bool:
        return bool(self.wave_ops or self.mel_ops)

    def describe(self) -> str:
        ops = [f"{op.label}({op.op})" for op in self.wave_ops] + ["log-mel"] + \
              [f"{op.label}({op.op})" for op in self.mel_ops]
        return " -> ".join(ops) + f"; {self.input_samples} samples in per view, {self.frames} frames out"

    def to(self, device: torch.device) -> Augmenter:
        """The chain's own tensors (its log-mel's filter bank and window) on ``device``."""
        self.logmel.to(device)
        return self

    # ---------------------------------------------------------------- the stage
    def augment(self, x: torch.Tensor, ids: BatchIds, arrives: str) -> torch.Tensor:
        """The one way in, for every back end and clip format: a batch of views as it
        ``arrives`` (:data:`dataio.formats.base.ARRIVALS`: float ``waves`` [B, V, S], stored
        ``db_frames`` [B, V, T, F], or normalised ``mels`` [B, V, F, T]) -> log-mel views
        [B, V, C, F, T]."""
        if arrives == WAVES:
            return self.from_waves(x, ids)
        if arrives == DB_FRAMES:
            return self.from_db_frames(x, ids)
        if arrives == MELS:
            return self.from_mels(x, ids)
        raise ValueError(f"a batch arrives as one of {', '.join(ARRIVALS)}, not {arrives!r}")

    @torch.no_grad()
    def from_waves(self, waves: torch.Tensor, ids: BatchIds) -> torch.Tensor:
        """Waves [B, V, input_samples] -> normalised log-mel views [B, V, C, F, T]."""
        b, v, s = waves.shape
        if s != self.input_samples:
            raise ValueError(f"expected {self.input_samples} samples per view, got {s}")
        rows = self._rows(ids, b, v, waves.device)
        x = waves.reshape(b * v, s).float()
        for op in self.wave_ops:
            x = self._apply(op, x, rows)
        mels = self.logmel(x)[:, 0]
        return self._finish(mels, rows, b, v)

    @torch.no_grad()
    def from_mels(self, mels: torch.Tensor, ids: BatchIds) -> torch.Tensor:
        """Log-mels [B, V, F, mel_frames_in] (a back end that computes them itself, with no
        waveform op in the chain) -> views [B, V, C, F, T]."""
        if self.wave_ops:
            raise ValueError("the chain has waveform ops: the back end must deliver waves")
        b, v, nf, nt = mels.shape
        if nt != self.mel_frames_in:
            raise ValueError(f"expected {self.mel_frames_in} frames per view, got {nt}")
        return self._finish(mels.reshape(b * v, nf, nt).float(), self._rows(ids, b, v, mels.device), b, v)

    @torch.no_grad()
    def from_db_frames(self, frames: torch.Tensor, ids: BatchIds) -> torch.Tensor:
        """Stored log-mel frames [B, V, mel_frames_in, F] in dB (a logmel corpus) -> views
        [B, V, C, F, T]."""
        return self.from_mels(self.frontend.normalise(frames.float()).transpose(-1, -2), ids)

    def _finish(self, x: torch.Tensor, rows: _RowState, b: int, v: int) -> torch.Tensor:
        for op in self.mel_ops:
            x = self._apply(op, x, rows)
        x = x[..., :self.frames].reshape(b, v, 1, *x.shape[-2:-1], self.frames)
        if self.frontend.channels > 1:
            x = x.expand(-1, -1, self.frontend.channels, -1, -1)
        return x

    def _apply(self, op: OpConfig, x: torch.Tensor, rows: _RowState) -> torch.Tensor:
        keys = rows.clip_keys if op.per == "clip" else rows.view_keys
        u = uniforms(keys, op.salt, 1 + op.draws)
        active = u[:, 0] < op.p
        if op.views:
            active &= torch.isin(rows.ctx.view, torch.tensor(op.views, device=x.device))
        out = op.apply(x, u[:, 1:], rows.ctx)
        kept = x[..., :out.shape[-1]]
        return torch.where(active.view(-1, *[1] * (x.dim() - 1)), out, kept)

    def _rows(self, ids: BatchIds, b: int, v: int, device: torch.device) -> _RowState:
        index = ids.indices.to(device).repeat_interleave(v)
        draw = ids.draws.to(device).repeat_interleave(v)
        view = torch.arange(v, device=device).repeat(b)
        base = scalar_key(self.seed, ids.epoch)
        batch_key = scalar_key(self.seed, ids.epoch, ids.step, ids.rank)
        pairs, clips = self.pairs, b // self.pairs

        def partners(salt: int) -> torch.Tensor:
            return _derangement_rows(scalar_key(batch_key, salt), clips, pairs, v).to(device)

        ctx = Rows(view=view, partners=partners, frontend=self.frontend)
        return _RowState(ctx=ctx, view_keys=row_keys(base, index, draw, view), clip_keys=row_keys(base, index, draw))


@dataclass
class _RowState:
    ctx: Rows
    view_keys: torch.Tensor
    clip_keys: torch.Tensor


def _derangement_rows(key: int, clips: int, pairs: int, views: int) -> torch.Tensor:
    """[clips * pairs * views] partner row of each row: for each view index a fresh random
    cyclic order of the clip slots, each slot paired with the next one (never itself);
    same pair number, same view. With a single clip a row is its own partner."""
    gen = generator(key)
    out = torch.empty(clips, pairs, views, dtype=torch.int64)
    pair_ids = torch.arange(pairs)[None, :]
    for view in range(views):
        order = torch.randperm(clips, generator=gen)
        partner = torch.empty(clips, dtype=torch.int64)
        partner[order] = order.roll(-1)
        out[:, :, view] = (partner[:, None] * pairs + pair_ids) * views + view
    return out.reshape(-1)
