"""What the views are, statistically (issue 34): the crops and every op's parameters are
drawn from the distributions the recipe names, the two views of a clip independently,
anew every epoch. The instruments score moved between two commits whose only data-path
difference was which random numbers placed the crops (a keyed hash instead of a numpy
generator per clip); these tests hold the draws to their distribution, so a change that
correlates the views, repeats crops across epochs or skews an op fails here, not after
100 epochs on real audio."""

import numpy as np
import pytest
import torch

from dataio.augment import BatchIds, build_augmenter
from dataio.augment.keyed import row_keys, scalar_key, uniforms
from dataio.backends.views import crop_keys, keyed_crop_starts
from dataio.frontend import FrontendConfig

CLIPS, EPOCHS, SIZE = 2000, 12, 16000


def _ks_uniform(x: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of ``x`` (in [0, 1)) from the uniform distribution."""
    x = np.sort(x.ravel())
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max()))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_crops_are_uniform_independent_between_views_and_new_every_epoch():
    lengths = np.random.default_rng(0).integers(8000, 5 * SIZE, CLIPS)  # a fifth shorter than a view
    idx = np.arange(CLIPS)
    starts = np.stack([keyed_crop_starts(lengths, SIZE, 2, crop_keys(0, e, idx, np.zeros(CLIPS, np.int64)))
                       for e in range(EPOCHS)])  # [E, N, 2]
    room = np.abs(lengths - SIZE)[None, :, None] + 1
    rel = np.abs(starts) / room  # where in its room each crop lies, [0, 1)
    long = lengths >= SIZE
    assert (starts[:, long] >= 0).all() and (starts[:, ~long] <= 0).all()  # inside; a short clip padded
    bound = 1.63 / np.sqrt(rel.size / 2)  # the KS test's 1 % critical value
    assert _ks_uniform(rel[:, long]) < bound * 1.5 and _ks_uniform(rel[:, ~long]) < 3 * bound
    limit = 4 / np.sqrt(EPOCHS * CLIPS)  # four standard errors of a correlation of independent draws
    assert abs(_corr(rel[..., 0], rel[..., 1])) < limit, "the two views of a clip are placed independently"
    assert abs(_corr(rel[:-1], rel[1:])) < limit, "a clip's crops are drawn anew each epoch"
    assert abs(_corr(rel[:, :-1], rel[:, 1:])) < limit, "neighbouring clips do not share draws"
    assert np.mean(starts[..., 0] == starts[..., 1]) < 0.01


def test_every_op_draws_uniformly_and_the_views_of_a_clip_independently():
    """The keyed uniforms each op reads, for (seed, epoch, clip, draw, view) as the chain
    keys them: uniform, independent between the views, between ops and between epochs."""
    index = torch.arange(4000).repeat_interleave(2)
    view = torch.arange(2).repeat(4000)
    draws = torch.zeros_like(index)
    u = {}
    for epoch in (0, 1):
        keys = row_keys(scalar_key(0, epoch), index, draws, view)
        for op, salt in (("gain", 11), ("rrc", 12)):
            u[epoch, op] = uniforms(keys, salt, 3).numpy().reshape(4000, 2, 3)
    limit = 4 / np.sqrt(4000)
    for (epoch, op), x in u.items():
        assert _ks_uniform(x) < 1.63 / np.sqrt(x.size) * 1.5, (epoch, op)
        assert abs(_corr(x[:, 0], x[:, 1])) < limit, f"{op}: the two views share draws"
        assert abs(_corr(x[..., 0], x[..., 1])) < limit, f"{op}: an op's draws are independent of each other"
    assert abs(_corr(u[0, "gain"], u[0, "rrc"])) < limit and abs(_corr(u[0, "gain"], u[1, "gain"])) < limit


@pytest.mark.parametrize("op,values,low,high", [("gain", {"db": [-6.0, 6.0]}, -6.0, 6.0),
                                                ("pitch_shift", {"semitones": [-2.0, 2.0]}, -2.0, 2.0)])
def test_the_demo_chain_applies_each_op_at_its_rate_with_parameters_spread_over_the_recipe_range(
        monkeypatch, op, values, low, high):
    """Through the real Augmenter: the share of views an op touches is its ``p`` and the
    parameter it draws covers the recipe's range uniformly (gain in dB, pitch in semitones)."""
    from dataio.augment import base

    seen = []
    real = base.lerp

    def recording(vals, u):
        out = real(vals, u)
        if list(vals) == [low, high]:
            seen.append(out.detach().flatten().clone())
        return out
    monkeypatch.setattr(base, "lerp", recording)
    for name in ("dataio.augment.wave", "dataio.augment.mel"):
        module = __import__(name, fromlist=["lerp"])
        if hasattr(module, "lerp"):
            monkeypatch.setattr(module, "lerp", recording)
    aug = build_augmenter({op: {**values, "p": 0.8}}, FrontendConfig(n_mels=32), 0.25, num_views=2,
                          pairs_per_clip=1, seed=0)
    b = 256
    ids = BatchIds(indices=torch.arange(b), draws=torch.zeros(b, dtype=torch.long), epoch=0, step=0, rank=0)
    waves = torch.randn(b, 2, aug.input_samples) * 0.1
    views = aug.from_waves(waves, ids)
    plain = build_augmenter({op: {**values, "p": 0.0}}, FrontendConfig(n_mels=32), 0.25, num_views=2,
                            pairs_per_clip=1, seed=0).from_waves(waves, ids)
    touched = (views != plain).flatten(2).any(-1).float().mean().item()
    assert abs(touched - 0.8) < 4 * np.sqrt(0.8 * 0.2 / (2 * b)), f"{op} touched {touched:.3f} of the views, p=0.8"
    drawn = torch.cat(seen).numpy()
    assert len(drawn) >= 2 * b
    assert drawn.min() >= low and drawn.max() <= high
    rel = (drawn - low) / (high - low)
    assert _ks_uniform(rel) < 1.63 / np.sqrt(len(rel)) * 1.5
