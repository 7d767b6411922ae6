"""Supervised contrastive loss (Khosla et al. 2020, the L_out form), the classifier's
cross-entropy, and SoundCLR's hybrid of the two."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.heads import ObjectiveParts
from trainer.objectives.common import wide


class ClassifierParts(ObjectiveParts):
    """SoundCLR's linear classifier inside the model: adds ``"logits"`` [B, V, C], the
    classes' scores of every view's L2-normalised encoder embedding."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__({"classifier": nn.Linear(embedding_dim, num_classes)})

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        classifier = self["classifier"]
        return {"logits": classifier(F.normalize(out["h"].to(classifier.weight.dtype), dim=-1))}


def label_affinity(labels_a: torch.Tensor, labels_b: torch.Tensor, *,
                   overlap_weighting: bool = False) -> torch.Tensor:
    """Weight [Na, Nb] of clip j as a label-positive of clip i (before normalisation).

    Class ids [N] (int, negative = no label): 1 where both carry the same label, else 0.
    Multi-hot [N, C]: 1 where the two label sets share at least one label, or with
    ``overlap_weighting`` their Jaccard overlap |Li & Lj| / |Li | Lj|; 0 for an empty set.
    The diagonal is not special-cased: the caller decides what a clip is to itself.
    """
    if labels_a.ndim == 1:
        same = labels_a[:, None] == labels_b[None, :]
        return (same & (labels_a[:, None] >= 0)).float()
    a, b = labels_a.float(), labels_b.float()
    inter = a @ b.T
    if not overlap_weighting:
        return (inter > 0).float()
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp_min(1.0)


def _anchors_with_a_positive(labels_all: torch.Tensor, views: int) -> torch.Tensor:
    """How many of the global batch's N*V anchors have at least one positive."""
    n = labels_all.shape[0]
    if views > 1:  # the clip's other views are always positives
        return torch.tensor(float(n * views), device=labels_all.device)
    partners = label_affinity(labels_all, labels_all)
    partners.fill_diagonal_(0.0)
    return (partners.sum(1) > 0).sum().float()


def supcon_loss(local: torch.Tensor, everyone: torch.Tensor, labels_local: torch.Tensor,
                labels_all: torch.Tensor, rank: int, *, temperature: float,
                overlap_weighting: bool = False) -> torch.Tensor:
    """Supervised contrastive loss of this rank's anchors against the global batch.

    local: [B, V, D] L2-normalised embeddings of this rank's clips (V >= 1 views);
    everyone: [W*B, V, D] the same for all ranks in rank order (gathered with gradient);
    labels_local / labels_all: int class ids [B] / [W*B] (-1 = unlabelled) or multi-hot
    [B, C] / [W*B, C]. Every view is an anchor; its candidates are the W*B*V - 1 other
    views. Positives: the other views of the same clip (weight 1) and every view of a clip
    sharing a label (weight 1, or the Jaccard overlap with ``overlap_weighting``). Per
    anchor, ``-sum_p w_p log softmax(p) / sum_p w_p`` (the average sits outside the log).
    Anchors without a positive are left out of the mean. The sum over this rank's anchors
    is divided by the global count of anchors with a positive over W (read from
    ``labels_all``, no collective), so the mean over ranks is exactly the single-process
    loss even when ranks hold different numbers of such anchors. No anchor with a positive
    anywhere: 0, still attached to the graph. Scalar, float32 (float64 for float64 input).
    """
    b, v, d = local.shape
    n = everyone.shape[0]
    if n % b or labels_all.shape[0] != n:
        raise ValueError(f"everyone has {n} clips, labels_all {labels_all.shape[0]}: need W*B with B={b}")
    labels_local, labels_all = labels_local.to(local.device), labels_all.to(local.device)
    with torch.autocast(local.device.type, enabled=False):  # float32 logits under autocast too
        anchors = wide(local).transpose(0, 1).reshape(v * b, d)                 # view-major
        cands = wide(everyone).transpose(0, 1).reshape(v * n, d)
        logits = anchors @ cands.T / temperature                                  # [V*B, V*W*B]
        weights, self_col = _positive_weights(labels_local, labels_all, rank, v, overlap_weighting, logits.dtype)
        logits = logits.scatter(1, self_col, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        log_prob = log_prob.masked_fill(weights == 0, 0.0)                        # drops the -inf self terms
        per_anchor = -(weights * log_prob).sum(1) / weights.sum(1).clamp_min(1e-12)  # 0 without positives
        count = _anchors_with_a_positive(labels_all, v).to(logits.dtype)
        return per_anchor.sum() * (n // b) / count.clamp_min(1.0)


def _positive_weights(labels_local: torch.Tensor, labels_all: torch.Tensor, rank: int, views: int,
                      overlap_weighting: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised positive weights [V*B, V*W*B] (view-major rows and columns, 0 = not a
    positive, the anchor itself 0) and each anchor's own column [V*B, 1]."""
    b, n = labels_local.shape[0], labels_all.shape[0]
    dev = labels_local.device
    own = torch.arange(b, device=dev) + rank * b
    clip_w = label_affinity(labels_local, labels_all, overlap_weighting=overlap_weighting).to(dtype)
    clip_w[torch.arange(b, device=dev), own] = 1.0                                # same clip, other views
    self_col = (torch.arange(views, device=dev).repeat_interleave(b) * n + own.repeat(views))[:, None]
    return clip_w.repeat(views, views).scatter(1, self_col, 0.0), self_col


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier, computed in float32 (float64 for float64 logits).

    logits: [N, C]. labels: class ids [N] (negative = unlabelled, ignored; none labelled
    gives 0 attached to the graph) -> mean softmax cross-entropy over the labelled rows;
    or multi-hot [N, C] -> binary cross-entropy with logits, mean over all N*C entries.
    """
    x = wide(logits)
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(x, labels.to(x.dtype))
    labelled = (labels >= 0).to(x.dtype)
    ce = F.cross_entropy(x, labels.clamp_min(0), reduction="none")
    return (ce * labelled).sum() / labelled.sum().clamp_min(1.0)


def hybrid_loss(supcon: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """SoundCLR's ``alpha * supcon + (1 - alpha) * ce`` (alpha in [0, 1]; 0.5 was best there)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * supcon + (1.0 - alpha) * ce
