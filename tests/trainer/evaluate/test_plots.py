"""Pictures and summary of an evaluation directory (trainer.evaluate.plots)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from threadpoolctl import threadpool_limits

from trainer.evaluate import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """t-SNE's OpenMP threads spin for minutes when the cores are shared with other jobs."""
    with threadpool_limits(1):
        yield


def assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2000
    assert not list(path.parent.glob("*.tmp.png"))


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    c = 6
    labels = rng.integers(0, c - 1, size=200)  # class c - 1 never appears as a true label
    preds = rng.integers(0, c, size=200)
    counts = plots.confusion_matrix(labels, preds, c)
    assert counts.dtype == np.int64 and counts.shape == (c, c)
    np.testing.assert_array_equal(counts, sk_confusion_matrix(labels, preds, labels=range(c)))
    assert counts[c - 1].sum() == 0 and counts.sum() == 200


def epoch(i: int, loss: float, **metrics: float) -> dict:
    return {"epoch": i, "train_loss": loss, **metrics}


def test_learning_curves_ragged(tmp_path):
    history = {
        "fold1": [epoch(1, 0.9, val_class_averaged_accuracy=0.5, test_class_averaged_accuracy=0.4),
                  epoch(2, 0.7, val_class_averaged_accuracy=0.6)],
        "fold2": [{"epoch": 1, "val_class_averaged_accuracy": 0.45},
                  epoch(2, 0.6, val_class_averaged_accuracy=0.7, test_class_averaged_accuracy=0.65, val_macro_f1=2.5)],
        "fold3": [],
    }
    out = plots.plot_learning_curves(history, tmp_path / "curves.png", "linear - demo")
    assert out == tmp_path / "curves.png"
    assert_png(out)


def test_learning_curves_many_rounds(tmp_path):
    rng = np.random.default_rng(1)
    history = {f"round{r}": [epoch(e, float(rng.random()), val_acc=float(rng.random()), test_acc=float(rng.random()))
                             for e in range(1, 6)] for r in range(12)}
    assert_png(plots.plot_learning_curves(history, tmp_path / "many.png", "12 rounds"))


@pytest.mark.parametrize("c", [3, 50])
def test_confusion_plot(tmp_path, c):
    rng = np.random.default_rng(c)
    counts = rng.integers(0, 10, size=(c, c))
    counts[1] = 0  # a class without support
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = plots.plot_confusion(counts, [f"class {i}" for i in range(c)], tmp_path / f"conf{c}.png", "confusion")
    assert_png(out)


def test_confusion_colour_and_cells_show_the_same_number():
    """The colour bar, the colours and the cell texts are all the % of the true class's clips;
    each row's clip count is on its label."""
    import matplotlib.pyplot as plt

    counts = np.array([[8, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [199, 0, 0, 1]])
    fig = plots.confusion_figure(counts, ["kick", "snare", "tom", "hat"], "confusion")
    try:
        ax = fig.axes[0]
        image = ax.images[0]
        assert image.get_clim() == (0.0, 100.0)
        label = image.colorbar.ax.get_ylabel()
        assert "% of the true class" in label and "row sums to 100" in label
        expected = 100.0 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        np.testing.assert_allclose(image.get_array(), expected)
        texts = [t.get_text() for t in ax.texts]
        assert texts == ["80", "20", "0", "0", "50", "50", "0", "0", "0", "0", "0", "0", ">99", "0", "0", "<1"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["kick (n=10)", "snare (n=2)", "tom (n=0)",
                                                                "hat (n=200)"]
    finally:
        plt.close(fig)


def test_tsne(tmp_path):
    rng = np.random.default_rng(2)
    centres = np.array([[0.0] * 8, [10.0] * 8, [-10.0] * 8])
    labels = np.repeat(np.arange(3), 20)
    embeddings = centres[labels] + rng.normal(size=(60, 8))
    labels[0] = -1  # one unlabelled clip
    out = plots.plot_tsne(embeddings, labels, ["a", "b", "c"], tmp_path / "tsne.png", "t-SNE", seed=0)
    assert out == tmp_path / "tsne.png"
    assert_png(out)


def test_tsne_subsamples(tmp_path):
    rng = np.random.default_rng(3)
    out = plots.plot_tsne(rng.normal(size=(80, 4)), rng.integers(0, 25, size=80), [f"c{i}" for i in range(25)],
                          tmp_path / "sub.png", "sub", max_points=40)
    assert_png(out)


def test_tsne_too_few_points(tmp_path):
    out = plots.plot_tsne(np.zeros((3, 4)), np.arange(3), ["a", "b", "c"], tmp_path / "few.png", "few")
    assert out is None
    assert not list(tmp_path.iterdir())


def linear_result() -> dict:
    return {"protocol": "linear", "encoder": "runs/demo/run", "data": "runs/demo/corpus", "num_clips": 400,
            "num_classes": 2, "multilabel": False, "class_names": ["dog", "rain"],
            "metrics": {"class_averaged_accuracy": {"mean": 0.81, "std": 0.02},
                        "macro_f1": {"mean": 0.8, "std": 0.03}, "wAP": {"mean": 0.85, "std": 0.01}},
            "rounds": {"fold1": {"class_averaged_accuracy": 0.79, "macro_f1": 0.77, "wAP": 0.84},
                       "fold2": {"class_averaged_accuracy": 0.83, "macro_f1": 0.83, "wAP": 0.86}},
            "per_class": {"dog": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 40},
                          "rain": {"precision": 0.7, "recall": 0.82, "f1": 0.76, "support": 38}},
            "pictures": {"confusion": "linear_confusion.png", "tsne": "linear_tsne.png"},
            "settings": {"seed": 0}}


def test_write_summary(tmp_path, caplog):
    (tmp_path / "linear.json").write_text(json.dumps(linear_result()))
    (tmp_path / "linear_confusion.png").write_bytes(PNG_SIGNATURE)  # linear_tsne.png is never written
    (tmp_path / "knn_old.json").write_text(json.dumps({"protocol": "knn", "encoder": "random_init",
                                                       "class_averaged_accuracy": 0.5, "std": 0.1}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "state.json").write_text(json.dumps({"step": 3}))
    with caplog.at_level("WARNING"):
        path = plots.write_summary(tmp_path)
    assert path == tmp_path / "summary.md"
    text = path.read_text()
    assert "linear" in text and "knn_old" in text
    assert "![confusion](linear_confusion.png)" in text
    assert "linear_tsne.png" not in text
    assert "0.810 ± 0.020" in text and "0.500 ± 0.100" in text
    assert "| dog | 0.900 | 0.800 | 0.850 | 40 |" in text
    assert "broken" not in text and "state" not in text
    assert "broken.json" in caplog.text and "state.json" in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_write_summary_empty_dir(tmp_path):
    assert "No evaluation results" in plots.write_summary(tmp_path).read_text()
