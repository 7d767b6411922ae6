"""kNN scoring, class-averaged accuracy, encoder export."""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from dataio.frontend import FrontendConfig
from trainer.evaluate.config import EvalConfig, KnnConfig
from trainer.evaluate.knn import knn_scores
from trainer.evaluate.metrics import class_averaged_accuracy
from trainer.evaluate.run import Evaluation
from trainer.models.encoders import build_encoder
from trainer.models.export import encoder_meta, export_encoder, load_encoder


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_scores_match_a_brute_force_vote():
    rng = np.random.default_rng(0)
    train, test = _unit(rng.normal(size=(30, 5))), _unit(rng.normal(size=(7, 5)))
    labels = rng.integers(0, 3, 30)
    got = knn_scores(train, labels, test, 3, k=4, temperature=0.1, chunk=3)
    for row, q in enumerate(test):
        sims = train @ q
        want = np.zeros(3)
        for j in np.argsort(-sims)[:4]:
            want[labels[j]] += np.exp(sims[j] / 0.1)
        assert np.allclose(got[row], want / want.sum())


def test_k_is_capped_by_the_training_set():
    train = _unit(np.eye(3))
    scores = knn_scores(train, np.array([0, 1, 1]), train[:1], 2, k=200, temperature=1.0)
    assert scores.shape == (1, 2) and np.isclose(scores.sum(), 1.0)


def test_class_averaged_accuracy_equals_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    assert class_averaged_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))


def test_exported_encoder_rebuilds_and_separates_tones(tmp_path):
    from tests.shard_utils import make_shards

    shards = make_shards(tmp_path / "shards", [12, 12], seconds=1.0)
    frontend = FrontendConfig(n_mels=32)
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", width=8).eval()
    export_encoder(encoder, encoder_meta("resnet18", 8, frontend, encoder.embedding_dim, 5, 0.5), tmp_path)
    loaded, front2, meta = load_encoder(tmp_path)
    x = torch.randn(2, 1, 32, 51)
    assert torch.equal(loaded(x), encoder(x)) and front2 == frontend and meta["step"] == 5
    # three tones of different pitch: even a random encoder separates them by kNN
    cfg = EvalConfig(pictures=False, knn=KnnConfig(k=5, aggregate="vote"))
    result = Evaluation("knn", tmp_path, shards.root, cfg).run()
    assert result["rounds"].keys() == {"fold1", "fold2"}
    assert result["metrics"]["class_averaged_accuracy"]["mean"] > 0.9


def test_shards_at_another_rate_than_the_encoder_are_refused_before_decoding(tmp_path):
    """The sample rate has one source, the shards' manifest, checked once against the encoder's."""
    from dataio.errors import ConfigError
    from tests.conftest import export_random_encoder
    from tests.shard_utils import make_shards
    from trainer.evaluate.run import check_rate

    (tmp_path / "run").mkdir()
    export_random_encoder(tmp_path / "run")  # 16 kHz
    manifest = make_shards(tmp_path / "shards", [4], seconds=0.3, rate=8000)
    with pytest.raises(ConfigError, match=r"at 8000 Hz but the encoder in .*run was trained on 16000 Hz"):
        Evaluation("knn", tmp_path / "run", tmp_path / "shards", EvalConfig())
    check_rate(make_shards(tmp_path / "same", [4], seconds=0.3), 16000, tmp_path / "run")
    assert manifest.sample_rate == 8000
