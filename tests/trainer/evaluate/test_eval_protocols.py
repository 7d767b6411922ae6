"""The evaluation protocols: rounds (folds / split / random, validation carving), kNN,
linear probe and fine-tuning end to end on a separable synthetic set, multi-label
scoring, resuming an evaluation, and the pictures + summary page."""

import json
import subprocess

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from dataio.frontend import FrontendConfig
from tests.conftest import PYTHON, cli_env, labelled_run
from trainer.evaluate.clips import ClipSet
from trainer.evaluate.config import EvalConfig, FinetuneConfig, KnnConfig, LinearConfig
from trainer.evaluate.knn import knn_scores
from trainer.evaluate.protocol import make_rounds, score
from trainer.evaluate.run import Evaluation, run_eval
from trainer.models.encoders import build_encoder
from trainer.models.export import encoder_meta, export_encoder


def _clips(folds, splits=None, labels=None, multilabel=False, classes=2):
    n = len(folds)
    labels = np.arange(n) % classes if labels is None else np.asarray(labels)
    targets = np.zeros((n, classes), dtype=np.float32)
    targets[np.arange(n)[labels >= 0], labels[labels >= 0]] = 1
    return ClipSet([f"k{i}" for i in range(n)], labels, targets, np.asarray(folds),
                   np.asarray(splits or [""] * n), [f"c{i}" for i in range(classes)], multilabel, 16000)


def test_every_clip_is_tested_exactly_once_across_folds():
    clips = _clips([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], labels=[0, 0, 1, 1, -1, 0, 1, 0, 1, 1, 0, 1])
    rounds = make_rounds(clips, "auto", val_fraction=0.25)
    assert [r.name for r in rounds] == ["fold1", "fold2", "fold3"]
    tested = np.concatenate([r.test for r in rounds])
    assert sorted(tested) == sorted(np.flatnonzero(clips.labels >= 0))  # the unlabelled clip 4 is never used
    for r in rounds:
        assert not set(r.train) & set(r.test) and not set(r.val) & set(r.test) and not set(r.val) & set(r.train)
        assert len(r.val) >= 1 and (clips.folds[r.val] != clips.folds[r.test[0]]).all()
    assert [r.name for r in make_rounds(clips, "folds", max_rounds=2)] == ["fold1", "fold2"]
    only = make_rounds(clips, "folds", val_fraction=0.25, only_folds=[2])  # the same round as among all
    assert [r.name for r in only] == ["fold2"] and (only[0].val == rounds[1].val).all()
    with pytest.raises(ValueError, match=r"eval.folds \[7\]"):
        make_rounds(clips, "folds", only_folds=[7])
    with pytest.raises(ValueError, match="needs rounds by folds"):
        make_rounds(clips, "random", only_folds=[1])


def test_validation_under_folds_is_a_whole_other_fold():
    # folds are groups (kits, instruments, source recordings): a validation clip must share
    # no fold with the training clips, or a sweep ranks trials by how well they memorise a group
    clips = _clips([1, 2, 3, 4] * 6)
    for r, (test, val) in zip(make_rounds(clips, "folds", val_fraction=0.2), [(1, 2), (2, 3), (3, 4), (4, 1)]):
        assert set(clips.folds[r.test]) == {test} and set(clips.folds[r.val]) == {val}
        assert set(clips.folds[r.train]) == {1, 2, 3, 4} - {test, val}
    two = _clips([1, 2] * 6)  # two folds: the only way to validate is a share of the training fold
    (r, _) = make_rounds(two, "folds", val_fraction=0.34)
    assert set(two.folds[r.val]) == set(two.folds[r.train]) == {2}


def test_split_protocol_uses_the_val_split_or_carves_one():
    splits = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    (r,) = make_rounds(_clips([0] * 10, splits), "auto", val_fraction=0.5)
    assert r.name == "test" and list(r.val) == [6, 7] and list(r.test) == [8, 9] and list(r.train) == list(range(6))
    clips = _clips([0] * 8, ["train"] * 6 + ["test"] * 2)
    (r,) = make_rounds(clips, "auto", val_fraction=0.34)
    assert len(r.val) == 2 and set(clips.labels[r.val]) == {0, 1} and set(r.val) < set(range(6))
    with pytest.raises(ValueError, match="no folds"):
        make_rounds(_clips([0] * 4), "folds")


def test_random_protocol_is_stratified_and_seeded():
    clips = _clips([0] * 20)
    (a,), (b,) = make_rounds(clips, "auto", seed=3), make_rounds(clips, "auto", seed=3)
    assert a.name == "random" and list(a.test) == list(b.test)
    assert np.bincount(clips.labels[a.test]).tolist() == [2, 2]


def test_multilabel_knn_votes_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    train, test = unit(rng.normal(size=(25, 4))), unit(rng.normal(size=(6, 4)))
    targets = (rng.random((25, 3)) < 0.4).astype(np.float32)
    got = knn_scores(train, targets, test, 3, k=5, temperature=0.2, chunk=2)
    for row, q in enumerate(test):
        top = np.argsort(-(train @ q))[:5]
        w = np.exp((train[top] @ q) / 0.2)
        assert np.allclose(got[row], (w[:, None] * targets[top]).sum(0) / w.sum())


def test_multilabel_score_equals_sklearn():
    rng = np.random.default_rng(1)
    targets = (rng.random((40, 4)) < 0.3).astype(np.float32)
    targets[0] = 1  # every class has a positive
    targets[1] = 0  # and a negative
    scores = rng.random((40, 4))
    clips = _clips([0] * 40, multilabel=True, classes=4)
    clips.targets = targets
    got = score(clips, np.arange(40), scores)
    assert got["mAP"] == pytest.approx(average_precision_score(targets, scores, average="macro"))
    assert got["auc"] == pytest.approx(roc_auc_score(targets, scores, average="macro"))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Three tone classes in two folds, and a random-init encoder exported as a run."""
    return labelled_run(tmp_path_factory.mktemp("tones"), width=8)


def _accuracy(result):
    return result["metrics"]["class_averaged_accuracy"]["mean"]


def test_knn_and_linear_probe_separate_tones(tones):
    knn = Evaluation("knn", tones, tones / "shards", EvalConfig(pictures=False, knn=KnnConfig(k=5))).run()
    linear = Evaluation("linear", tones, tones / "shards",
                        EvalConfig(pictures=False, linear=LinearConfig(epochs=10))).run()
    assert _accuracy(knn) > 0.9 and _accuracy(linear) > 0.9
    assert linear["history"]["fold1"][-1]["train_loss"] < linear["history"]["fold1"][0]["train_loss"]
    for result in (knn, linear):
        assert sorted(result["tested"]) == [f"clip{i:05d}" for i in range(24)]  # each clip once
        assert set(result["metrics"]) == {"class_averaged_accuracy", "macro_f1", "wAP"}


def test_a_new_protocol_is_one_registry_entry(tones, monkeypatch):
    """Issue 37, item 4: whether a protocol is frozen, its epochs and its learner come from
    the registry; Evaluation (and the sweeps) hold no per-protocol table of their own."""
    from dataclasses import replace

    from trainer.evaluate import protocols
    from trainer.evaluate.learners import KnnLearner

    nearest = protocols.Protocol("nearest", frozen=True, epochs=lambda cfg: 1,
                                 learner=lambda ev, i, r: KnnLearner(ev.clips, ev.frozen, r, replace(ev.cfg.knn, k=1)))
    monkeypatch.setitem(protocols.REGISTRY, "nearest", nearest)
    result = Evaluation("nearest", tones, tones / "shards", EvalConfig(pictures=False)).run()
    assert result["protocol"] == "nearest" and _accuracy(result) > 0.9
    assert sorted(result["tested"]) == [f"clip{i:05d}" for i in range(24)]
    assert [p.frozen for p in protocols.REGISTRY.values()][:3] == [True, True, False]


def test_given_clips_and_embeddings_are_used_as_computed_here(tones, monkeypatch):
    """A sweep loads the clips and embeds them once (frozen_embeddings), then hands them to
    each trial's Evaluation, which must score as if it had computed them itself."""
    from dataio.reading.manifest import load_manifest
    from trainer.evaluate import ranks as ranks_module
    from trainer.evaluate.clips import load_clipset
    from trainer.evaluate.run import frozen_embeddings

    cfg = EvalConfig(pictures=False, linear=LinearConfig(epochs=3))
    alone = Evaluation("linear", tones, tones / "shards", cfg)
    assert alone.embedded_here
    clips = load_clipset(load_manifest(tones / "shards"))
    frozen = frozen_embeddings(tones, clips, cfg)
    np.testing.assert_array_equal(frozen.patches, alone.frozen.patches)

    def refuse(*args, **kwargs):
        raise AssertionError("embedded again")

    monkeypatch.setattr(ranks_module, "embed_clips", refuse)
    given = Evaluation("linear", tones, tones / "shards", cfg, clips=clips, frozen=frozen)
    assert not given.embedded_here
    assert given.run()["metrics"] == alone.run()["metrics"]
    with pytest.raises(ValueError, match="embeddings of 23 clips given for 24"):
        Evaluation("knn", tones, tones / "shards", cfg, clips=clips,
                   frozen=type(frozen)(frozen.patches[frozen.owner < 23], frozen.owner[frozen.owner < 23]))


def test_scores_do_not_depend_on_the_scale_of_the_embeddings(tones):
    """A random-init EfficientNet-B0 in eval mode embeds every clip at a scale near 1e-13:
    the linear probe's standardisation and the kNN's unit vectors must not take such
    features for constant (an absolute floor did, and the probe scored chance)."""
    from dataio.reading.manifest import load_manifest
    from trainer.evaluate.clips import load_clipset
    from trainer.evaluate.run import frozen_embeddings

    cfg = EvalConfig(pictures=False, linear=LinearConfig(epochs=10), knn=KnnConfig(k=5))
    clips = load_clipset(load_manifest(tones / "shards"))
    frozen = frozen_embeddings(tones, clips, cfg)
    tiny = type(frozen)(frozen.patches * np.float32(1e-13), frozen.owner)
    for protocol in ("linear", "knn"):
        as_is = Evaluation(protocol, tones, tones / "shards", cfg, clips=clips, frozen=frozen).run()
        scaled = Evaluation(protocol, tones, tones / "shards", cfg, clips=clips, frozen=tiny).run()
        assert _accuracy(as_is) > 0.9, protocol
        assert _accuracy(scaled) == pytest.approx(_accuracy(as_is), abs=1e-9), protocol


@pytest.mark.parametrize("loss", ["ce", "hybrid"])
def test_finetuning_reaches_high_accuracy(tones, loss):
    cfg = EvalConfig(pictures=False, finetune=FinetuneConfig(epochs=12, batch_size=4, loss=loss))
    result = Evaluation("finetune", tones, tones / "shards", cfg).run()
    assert _accuracy(result) > 0.9, result["metrics"]


def test_finetuning_from_random_init_runs_and_resumes_exactly(tones):
    cfg = EvalConfig(pictures=False, val_fraction=0.25, finetune=FinetuneConfig(epochs=3, batch_size=4))
    whole = Evaluation("finetune", tones, tones / "shards", cfg, random_init=True).run()
    first = Evaluation("finetune", tones, tones / "shards", cfg, random_init=True)
    first.step()
    state = first.state_dict()
    second = Evaluation("finetune", tones, tones / "shards", cfg, random_init=True)
    second.load_state_dict(state)
    resumed = second.run()
    assert resumed["history"] == whole["history"] and resumed["encoder"] == "random_init"
    assert all(np.isfinite(h[-1]["val_class_averaged_accuracy"]) for h in whole["history"].values())


def test_multilabel_shards_are_scored_with_map(tones, tmp_path):
    import shutil

    shutil.copytree(tones / "shards", tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({**manifest, "multi_label": True}))
    for protocol in ("knn", "linear"):
        result = Evaluation(protocol, tones, tmp_path / "shards",
                            EvalConfig(pictures=False, knn=KnnConfig(k=5), linear=LinearConfig(epochs=5))).run()
        assert result["multilabel"] and result["primary_metric"] == "mAP"
        assert set(result["metrics"]) == {"mAP", "auc", "d_prime"} and result["metrics"]["mAP"]["mean"] > 0.9


@pytest.mark.e2e
def test_eval_cli_writes_pictures_and_summary(tones, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tones, run, ignore=shutil.ignore_patterns("shards"))
    cmd = [PYTHON, "-m", "trainer.cli", "eval", "--run", str(run), "--data", str(tones / "shards"),
           "--protocol", "linear", "eval.linear.epochs=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class_averaged_accuracy" in done.stdout
    out = run / "eval" / "shards"
    for name in ("linear.json", "linear_curves.png", "linear_confusion.png", "linear_tsne.png", "summary.md"):
        assert (out / name).is_file(), name
    assert (out / "linear_tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "linear_confusion.png" in summary and "linear_curves.png" in summary
    bad = subprocess.run(cmd[:-1] + ["eval.linear.epoch=3"], capture_output=True, text=True, env=cli_env())
    assert bad.returncode == 2 and "eval.linear.epochs" in bad.stderr
    first = (out / "linear.json").read_bytes()
    again = subprocess.run(cmd + ["eval.pictures=false"], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert again.returncode == 0 and f"results in {out / 'linear-2.json'}" in again.stdout
    assert (out / "linear.json").read_bytes() == first, "an earlier result is never replaced unasked"
    subprocess.run(cmd + ["eval.pictures=false", "--overwrite"], check=True, capture_output=True, env=cli_env())
    assert not (out / "linear-3.json").exists() and (out / "linear.json").read_bytes() != first


def test_run_eval_random_init_writes_its_own_result(tones, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tones, run, ignore=shutil.ignore_patterns("shards"))
    run_eval(run, tones / "shards", EvalConfig(pictures=False, knn=KnnConfig(k=5)), "knn", random_init=True)
    saved = json.loads((run / "eval" / "shards" / "knn_random_init.json").read_text())
    assert saved["encoder"] == "random_init" and saved["pictures"] == {}


@pytest.mark.e2e
def test_an_encoder_with_nan_weights_is_refused_with_a_message(tones, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=8).eval()
    with torch.no_grad():
        encoder.conv1.weight.fill_(float("nan"))
    export_encoder(encoder, encoder_meta("resnet18", 8, FrontendConfig(n_mels=32), encoder.embedding_dim, 1, 0.5),
                   tmp_path)
    done = subprocess.run([PYTHON, "-m", "trainer.cli", "eval", "--run", str(tmp_path), "--data",
                           str(tones / "shards"), "--protocol", "linear"],
                          capture_output=True, text=True, env=cli_env())
    assert done.returncode == 2 and "non-finite embeddings" in done.stderr
    assert not (tmp_path / "eval").exists()
