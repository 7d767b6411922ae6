"""Evaluation that streams: clips decoded as they are embedded (no audio held), the patch
embeddings held once, kNN scored in blocks, the linear probe in minibatches, fine-tuning's
crops read from the shards each epoch."""

import tracemalloc

import numpy as np
import pytest
import torch

from dataio.reading.manifest import load_manifest
from tests.conftest import export_random_encoder
from tests.shard_utils import make_shards
from trainer.evaluate import embed as embed_module
from trainer.evaluate.clips import load_clipset
from trainer.evaluate.config import EvalConfig
from trainer.evaluate.embed import ClipEmbeddings, Rows, embed_clips
from trainer.evaluate.knn import knn_scores
from trainer.evaluate.run import frozen_embeddings
from trainer.models.export import load_encoder


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _full_matrix_knn(train, labels, test, c, k, temperature):
    """The reference: the whole [M, N] similarity matrix at once."""
    sims = test @ train.T
    top = np.argsort(-sims, axis=1)[:, :k]
    weights = np.exp((np.take_along_axis(sims, top, 1) - sims.max(1, keepdims=True)) / temperature)
    if labels.ndim == 2:
        return np.einsum("mk,mkc->mc", weights, labels[top]) / weights.sum(1, keepdims=True)
    out = np.zeros((len(test), c))
    for m in range(len(test)):
        np.add.at(out[m], labels[top[m]], weights[m])
    return out / out.sum(1, keepdims=True)


@pytest.mark.parametrize("multi", [False, True])
def test_blockwise_knn_equals_the_full_matrix(multi):
    rng = np.random.default_rng(0)
    train, test = _unit(rng.normal(size=(203, 16))), _unit(rng.normal(size=(37, 16)))
    labels = (rng.random((203, 4)) < 0.4).astype(np.float32) if multi else rng.integers(0, 4, 203)
    want = _full_matrix_knn(train, labels, test, 4, 9, 0.07)
    for chunk, block in [(5, 7), (37, 203), (1024, 8192), (3, 1)]:
        got = knn_scores(train, labels, test, 4, k=9, temperature=0.07, chunk=chunk, block=block)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    lazy = knn_scores(Rows(train, np.arange(203)), labels, Rows(test, np.arange(37)), 4, k=9,
                      temperature=0.07, chunk=4, block=10)
    np.testing.assert_allclose(lazy, want, rtol=1e-5, atol=1e-7)


def test_clip_means_and_unit_rows_are_computed_a_block_at_a_time(monkeypatch):
    rng = np.random.default_rng(1)
    owner = np.sort(rng.integers(0, 40, 150))
    owner[0] = 0
    patches = rng.normal(size=(150, 8)).astype(np.float32)
    patches[3] = 0  # a zero embedding stays zero
    unit = patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-30)
    sums = np.zeros((owner.max() + 1, 8))
    np.add.at(sums, owner, unit)
    want = sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12)
    monkeypatch.setattr(embed_module, "BLOCK", 7)
    emb = ClipEmbeddings(patches, owner)
    np.testing.assert_allclose(emb.clip_means(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(emb.unit_rows(np.array([5, 3, 9]))[0:3], unit[[5, 3, 9]], rtol=1e-6)
    with pytest.raises(ValueError, match="clip order"):
        ClipEmbeddings(patches[::-1].copy(), owner[::-1].copy())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    make_shards(root / "shards", [10, 10, 10], seconds=1.0)
    export_random_encoder(root)
    return root


def test_a_loaded_clip_set_holds_no_audio(corpus, tmp_path):
    """The clip set keeps keys, labels, folds and splits, not the clips' bytes: what it
    retains is a few hundred bytes a clip (held FLAC of these 1-s clips: ~20 KB each)."""
    more = make_shards(tmp_path / "more", [60, 60], seconds=1.0)
    retained = {}
    for name, manifest in (("30", load_manifest(corpus / "shards")), ("120", more)):
        tracemalloc.start()
        clips = load_clipset(manifest)
        retained[name] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert not clips.held and len(clips) == int(name)
    per_clip = (retained["120"] - retained["30"]) / 90
    assert per_clip < 1024, f"{per_clip:.0f} bytes retained per clip"
    held = load_clipset(more, keep_audio=True)
    assert sum(map(len, held.audio)) / len(held) > 10 * per_clip


def test_streamed_embeddings_equal_held_ones_and_read_only_the_shards_needed(corpus, monkeypatch):
    from trainer.evaluate import clips as clips_module

    manifest = load_manifest(corpus / "shards")
    streamed, held = load_clipset(manifest), load_clipset(manifest, keep_audio=True)
    cfg = EvalConfig(pictures=False)
    a, b = frozen_embeddings(corpus, streamed, cfg), frozen_embeddings(corpus, held, cfg)
    np.testing.assert_array_equal(a.patches, b.patches)
    np.testing.assert_array_equal(a.owner, b.owner)
    read, real = [], clips_module.raw_samples
    monkeypatch.setattr(clips_module, "raw_samples", lambda m, ids, errs: (read.extend(ids), real(m, ids, errs))[1])
    encoder, frontend, _ = load_encoder(corpus)
    share = embed_clips(encoder, frontend, streamed, patch_seconds=0.5, hop_seconds=0.25, batch_size=8,
                        device=torch.device("cpu"), rows=np.arange(12, 18))
    assert read == [1] and sorted(set(share.owner.tolist())) == list(range(12, 18))
    np.testing.assert_allclose(share.patches, a.patches[np.isin(a.owner, range(12, 18))], rtol=1e-5, atol=1e-6)


def test_shards_that_lose_clips_after_loading_are_named(corpus, tmp_path):
    import shutil

    shutil.copytree(corpus / "shards", tmp_path / "shards")
    clips = load_clipset(load_manifest(tmp_path / "shards"))
    make_shards(tmp_path / "shards", [10, 10, 10], seconds=1.0, seed=0)  # same keys: still found
    assert len(list(clips.waves(range(30)))) == 30
    clips.keys[4] = "renamed"
    with pytest.raises(ValueError, match="changed since they were read: 1 clip"):
        list(clips.waves(range(10)))


def test_embeddings_are_kept_in_the_eval_folder_and_reused(corpus, tmp_path, monkeypatch, caplog):
    """A rerun and a second frozen protocol read the kept embeddings; other patch settings
    or other weights make them stale: embedded again, with a warning naming what differs."""
    import shutil

    from trainer.evaluate import ranks as ranks_module
    from trainer.evaluate.config import KnnConfig, LinearConfig
    from trainer.evaluate.run import Evaluation, run_eval

    run = tmp_path / "run"
    shutil.copytree(corpus, run, ignore=shutil.ignore_patterns("shards", "eval", "again"))
    cfg = EvalConfig(pictures=False, knn=KnnConfig(k=5), linear=LinearConfig(epochs=2))
    first = run_eval(run, corpus / "shards", cfg, "knn")
    kept = run / "eval" / "shards" / "embeddings.npz"
    assert kept.is_file()
    real, calls = ranks_module.embed_clips, []
    monkeypatch.setattr(ranks_module, "embed_clips", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    again = run_eval(run, corpus / "shards", cfg, "knn")
    assert calls == [] and again["metrics"] == first["metrics"]
    run_eval(run, corpus / "shards", cfg, "linear")
    assert calls == []
    fresh = Evaluation("linear", run, corpus / "shards", cfg)  # no cache folder: embeds, and agrees
    np.testing.assert_array_equal(fresh.frozen.patches, np.load(kept)["patches"])
    calls.clear()
    with caplog.at_level("WARNING"):
        run_eval(run, corpus / "shards", EvalConfig(pictures=False, hop_seconds=0.5), "knn")
    assert calls == [1] and "stale (hop differ)" in caplog.text
    export_random_encoder(run, seed=1)  # new weights
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_eval(run, corpus / "shards", EvalConfig(pictures=False, hop_seconds=0.5), "knn")
    assert calls == [1, 1] and "stale (encoder_sha256 differ)" in caplog.text
    kept.write_bytes(b"not an npz")
    run_eval(run, corpus / "shards", cfg, "knn")
    assert len(calls) == 3 and np.load(kept)["patches"].shape[1] == 64


def test_epoch_crops_read_each_training_clip_once_shard_by_shard_in_a_seeded_order(corpus, monkeypatch):
    """An epoch reads the shards holding the rows in an order drawn from (seed, epoch), each
    once; a crop is a window of its clip; a buffer of 1 passes the reading order through,
    a larger one shuffles it; held audio gives the same crops as the shards."""
    from numpy.lib.stride_tricks import sliding_window_view

    from trainer.evaluate import clips as clips_module
    from trainer.evaluate.finetune import epoch_crops

    manifest = load_manifest(corpus / "shards")
    streamed, held = load_clipset(manifest), load_clipset(manifest, keep_audio=True)
    rows = np.arange(2, 27)  # in shards 0, 1 and 2
    read, real = [], clips_module.raw_samples
    monkeypatch.setattr(clips_module, "raw_samples", lambda m, ids, errs: (read.extend(ids), real(m, ids, errs))[1])
    first = list(epoch_crops(streamed, rows, 8000, 0.0, 1, seed=3, epoch=1))
    shards = np.random.default_rng([3, 1]).permutation(3).tolist()
    assert read == shards and [r for r, _ in first] == sorted(rows.tolist(), key=lambda r: (shards.index(r // 10), r))
    for row, crop in first[:3]:
        assert crop.dtype == np.float32 and (sliding_window_view(held.wave(row), 8000) == crop).all(axis=1).any()
    shuffled = list(epoch_crops(streamed, rows, 8000, 6.0, 8, seed=3, epoch=1))
    assert sorted(r for r, _ in shuffled) == rows.tolist() and [r for r, _ in shuffled] != [r for r, _ in first]
    for (r, a), (s, b) in zip(shuffled, epoch_crops(held, rows, 8000, 6.0, 8, seed=3, epoch=1)):
        assert r == s and np.array_equal(a, b)
    later = list(epoch_crops(streamed, rows, 8000, 6.0, 8, seed=3, epoch=2))
    assert [r for r, _ in later] != [r for r, _ in shuffled]


def test_finetuning_holds_no_audio_and_a_rerun_scores_the_same(corpus, monkeypatch):
    """Fine-tuning trains on crops read from the shards and scores from them: the clip set
    holds no audio, nothing asks for held audio, and two runs give identical histories."""
    from trainer.evaluate.clips import ClipSet
    from trainer.evaluate.config import FinetuneConfig
    from trainer.evaluate.run import Evaluation

    def refuse(self):
        raise AssertionError("fine-tuning asked for held audio")

    monkeypatch.setattr(ClipSet, "_held", refuse)
    cfg = EvalConfig(pictures=False, val_fraction=0.25, max_rounds=1,
                     finetune=FinetuneConfig(epochs=2, batch_size=4, gain_db=3.0, shuffle_buffer=5))
    runs = []
    for _ in range(2):
        evaluation = Evaluation("finetune", corpus, corpus / "shards", cfg)
        assert not evaluation.clips.held
        runs.append(evaluation.run())
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["metrics"] == runs[1]["metrics"]
    for history in runs[0]["history"].values():
        assert len(history) == 2 and all(np.isfinite(h["train_loss"]) and np.isfinite(h["test_wAP"]) for h in history)
    assert len(evaluation.tsne_embeddings()) == 30


def _embed_on_rank(rank: int, world: int, root) -> tuple:
    from trainer.evaluate.ranks import embed_over_ranks
    from trainer.parallel.distributed import DistInfo

    encoder, frontend, _ = load_encoder(root)
    clips = load_clipset(load_manifest(root / "shards"))
    emb = embed_over_ranks(encoder, frontend, clips, DistInfo(rank, world, rank), patch_seconds=0.5,
                           hop_seconds=0.25, batch_size=8, device=torch.device("cpu"))
    return emb.patches, emb.owner


@pytest.mark.e2e
def test_two_ranks_embed_what_one_process_embeds(corpus):
    """Each of 2 gloo ranks embeds its contiguous share; gathered in clip order, every rank
    holds the one-process array."""
    from tests.dist_utils import run_workers

    one = _embed_on_rank(0, 1, corpus)
    for patches, owner in run_workers(_embed_on_rank, 2, corpus):
        np.testing.assert_array_equal(owner, one[1])
        np.testing.assert_allclose(patches, one[0], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_audioclr_launch_eval_scores_as_one_process(corpus, tmp_path):
    import json
    import shutil
    import subprocess

    from tests.conftest import PYTHON, cli_env

    results = {}
    for name, launch in (("one", []), ("two", ["launch", "--nproc-per-node", "2"])):
        run = tmp_path / name
        shutil.copytree(corpus, run, ignore=shutil.ignore_patterns("shards", "eval", "again"))
        done = subprocess.run([PYTHON, "-m", "trainer.cli", *launch, "eval", "--run", str(run), "--data",
                               str(corpus / "shards"), "--protocol", "knn", "eval.pictures=false", "eval.knn.k=5"],
                              capture_output=True, text=True, env=cli_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = json.loads((run / "eval" / "shards" / "knn.json").read_text())
        kept = np.load(run / "eval" / "shards" / "embeddings.npz")
        results[name + "_patches"] = kept["patches"]
    assert results["two"]["metrics"] == results["one"]["metrics"]
    np.testing.assert_allclose(results["two_patches"], results["one_patches"], rtol=1e-5, atol=1e-6)
    refused = subprocess.run([PYTHON, "-m", "trainer.cli", "launch", "--nproc-per-node", "2", "eval", "--run",
                              str(tmp_path / "one"), "--data", str(corpus / "shards"), "--protocol", "finetune"],
                             capture_output=True, text=True, env=cli_env(), timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "run --protocol finetune as one process" in refused.stderr
