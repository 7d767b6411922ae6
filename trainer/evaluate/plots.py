"""Pictures and the one-page markdown summary of an evaluation directory.

Every PNG and ``summary.md`` is written atomically (temporary file + ``os.replace``) so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from dataio.atomic import write_text_atomically  # noqa: E402

log = logging.getLogger(__name__)
PNG_DPI = 100


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C] counts of [N] true ``labels`` (rows) against [N] ``predictions`` (columns);
    pairs with either id outside [0, C) are ignored."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in length")
    keep = (labels >= 0) & (labels < num_classes) & (predictions >= 0) & (predictions < num_classes)
    flat = labels[keep] * num_classes + predictions[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).astype(np.int64)


def _save(fig, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, dpi=PNG_DPI, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop: no half picture left behind
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _palette(n: int) -> list:
    """n distinct colours: tab10, tab20, or a continuous colormap beyond 20."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    cmap = plt.get_cmap("turbo")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _number(value) -> float | None:
    """``value`` as a float, or None when it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    return float(value)


def _series(epochs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over one round's per-epoch dicts, skipping gaps."""
    xs, ys = [], []
    for i, row in enumerate(epochs):
        y = _number(row.get(key)) if isinstance(row, dict) else None
        if y is not None:
            x = _number(row.get("epoch"))
            xs.append(i + 1 if x is None else x)
            ys.append(y)
    return xs, ys


def _style(metric: str) -> str:
    """Line style: solid for test_ metrics (and the loss), dashed for val_, dotted otherwise."""
    if metric.startswith("test_") or metric == "train_loss":
        return "-"
    return "--" if metric.startswith("val_") else ":"


def _draw(ax, history: dict[str, list[dict]], key: str, colours: dict, many: bool) -> None:
    """Draw ``key`` per round on ``ax``; with ``many`` rounds also their mean in black."""
    by_epoch: dict[float, list[float]] = defaultdict(list)
    for name, epochs in history.items():
        xs, ys = _series(epochs, key)
        if xs:
            ax.plot(xs, ys, _style(key), color=colours[name], lw=0.8 if many else 1.5, alpha=0.35 if many else 1.0)
        for x, y in zip(xs, ys):
            by_epoch[x].append(y)
    if many and by_epoch:
        xs = sorted(by_epoch)
        ax.plot(xs, [float(np.mean(by_epoch[x])) for x in xs], _style(key), color="black", lw=2.0)


def plot_learning_curves(history: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """Training loss (left) and every other metric (right) per epoch of each round;
    ``history`` maps round name -> list of per-epoch dicts."""
    history = {str(k): list(v or []) for k, v in history.items()}
    metrics = list(dict.fromkeys(k for rows in history.values() for row in rows if isinstance(row, dict)
                                 for k in row if k not in ("epoch", "train_loss")))
    many = len(history) > 10
    colours = dict(zip(history, _palette(len(history))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw(left, history, "train_loss", colours, many)
    for metric in metrics:
        _draw(right, history, metric, colours, many)
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    right.set(xlabel="epoch", ylabel="metric", title="metrics")
    handles = [Line2D([], [], color="grey", ls=_style(m), label=m) for m in metrics]
    if many:
        handles.append(Line2D([], [], color="black", lw=2.0, label=f"mean of {len(history)} rounds"))
    else:
        handles += [Line2D([], [], color=c, label=n) for n, c in colours.items()]
    if handles:
        right.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_confusion(counts: np.ndarray, class_names: list[str], path: str | Path, title: str) -> Path:
    """Write :func:`confusion_figure` of [C, C] ``counts`` to ``path``."""
    return _save(confusion_figure(counts, class_names, title), path)


def _percent_text(percent: float) -> str:
    """A cell's percentage, whole; "<1" and ">99" where rounding would hide that a share
    is neither none nor all."""
    if 0 < percent < 1:
        return "<1"
    return ">99" if 99 < percent < 100 else f"{percent:.0f}"


def confusion_figure(counts: np.ndarray, class_names: list[str], title: str):
    """Heat map of [C, C] ``counts`` (rows true, columns predicted) as the percentage of
    each true class's clips: colour and cell text (up to 20 classes) show the same number,
    so every row reads as that class's recall and confusions whatever its size; each row's
    clip count is on its label ("dog (n=40)"), a cell's count is that times its share."""
    counts = np.asarray(counts)
    c = counts.shape[0]
    if counts.shape != (c, c) or len(class_names) != c:
        raise ValueError(f"counts {counts.shape} do not match {len(class_names)} class names")
    support = counts.sum(axis=1, keepdims=True).astype(np.float64)
    percent = 100.0 * np.divide(counts, support, out=np.zeros((c, c)), where=support > 0)
    side = max(5.0, 0.25 * c + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(percent, cmap="Blues", vmin=0.0, vmax=100.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the true class's clips (each row sums to 100)")
    ticks = np.arange(c)
    size = 8 if c <= 20 else 6
    ax.set_xticks(ticks, [str(n) for n in class_names], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [f"{n} (n={int(k)})" for n, k in zip(class_names, support[:, 0])], fontsize=size)
    ax.set(xlabel="predicted", ylabel="true (clips)", title=title)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, _percent_text(percent[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if percent[i, j] > 50 else "black")
    return fig


def plot_tsne(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path,
              title: str, seed: int = 0, max_points: int = 5000) -> Path | None:
    """2-D t-SNE of [N, D] ``embeddings`` coloured by [N] ``labels`` (< 0 = unlabelled);
    None when N < 5."""
    from sklearn.manifold import TSNE  # deferred: scikit-learn is slow to import
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
        x, y = x[keep], y[keep]
    n = len(x)
    if n < 5:
        return None
    # one thread: t-SNE's worker threads spin-wait, and on a busy machine that costs 50x
    with threadpool_limits(1):
        points = TSNE(n_components=2, init="pca", perplexity=min(30.0, (n - 1) / 3),
                      random_state=seed).fit_transform(x)
    num = max(len(class_names), int(y.max()) + 1 if n else 0)
    colours = _palette(num)
    fig, ax = plt.subplots(figsize=(7, 6))
    unlabelled = y < 0
    if unlabelled.any():
        ax.scatter(*points[unlabelled].T, s=8, color="lightgrey", label="unlabelled")
    for k in np.unique(y[~unlabelled]):
        name = class_names[k] if k < len(class_names) else str(k)
        ax.scatter(*points[y == k].T, s=8, color=colours[k], label=str(name))
    if num <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set(xticks=[], yticks=[], title=title)
    return _save(fig, path)


def _fmt(value) -> str:
    """A table cell: 3 decimals for numbers, text otherwise."""
    number = _number(value)
    if number is not None and not isinstance(value, int | np.integer):
        return f"{number:.3f}"
    return "—" if value is None else str(value).replace("|", "\\|")


def _stat(entry) -> str:
    """``mean ± std`` of a {"mean", "std"} metric entry (or a bare number)."""
    if isinstance(entry, dict):
        mean, std = _number(entry.get("mean")), _number(entry.get("std"))
        if mean is None:
            return "—"
        return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    return _fmt(entry)


def _metrics(result: dict) -> dict:
    """The result's metric name -> {"mean", "std"}; old kNN files carry only the top-level
    class_averaged_accuracy and std."""
    metrics = result.get("metrics")
    if isinstance(metrics, dict):
        return metrics
    if "class_averaged_accuracy" in result:
        return {"class_averaged_accuracy": {"mean": result["class_averaged_accuracy"], "std": result.get("std")}}
    return {}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _load_results(eval_dir: Path) -> list[tuple[str, dict]]:
    """(stem, result) of every parseable ``*.json`` with a "protocol" key, sorted by name."""
    results = []
    for file in sorted(eval_dir.glob("*.json")):
        try:
            result = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            log.warning("summary: skipping %s (%s)", file.name, err)
            continue
        if not isinstance(result, dict) or "protocol" not in result:
            log.warning("summary: skipping %s (not an evaluation result)", file.name)
            continue
        results.append((file.stem, result))
    return results


def _overview(results: list[tuple[str, dict]]) -> list[str]:
    names = list(dict.fromkeys(m for _, r in results for m in _metrics(r)))
    rows = []
    for stem, r in results:
        metrics = _metrics(r)
        rounds = r.get("rounds")
        rows.append([_fmt(stem), _fmt(r.get("protocol")), _fmt(r.get("encoder"))]
                    + [_stat(metrics[m]) if m in metrics else "—" for m in names]
                    + [str(len(rounds)) if isinstance(rounds, dict | list) else "—"])
    return _table(["result", "protocol", "encoder", *names, "rounds"], rows)


def _section(stem: str, r: dict, eval_dir: Path) -> list[str]:
    """The per-result section: facts, per-round table, per-class table, pictures."""
    lines = [f"## {stem}", ""]
    facts = [f"{k}: {_fmt(r[k])}" for k in ("protocol", "encoder", "data", "num_clips", "num_classes",
                                            "multilabel", "primary_metric") if k in r]
    lines += [f"- {fact}" for fact in facts] + [""]
    rounds = r.get("rounds")
    if isinstance(rounds, dict) and rounds:
        keys = list(dict.fromkeys(k for v in rounds.values() if isinstance(v, dict) for k in v))
        rows = [[_fmt(name)] + [_fmt(v.get(k)) if isinstance(v, dict) else "—" for k in keys]
                for name, v in rounds.items()]
        lines += ["### Rounds", "", *_table(["round", *keys], rows), ""]
    per_class = r.get("per_class")
    if isinstance(per_class, dict) and per_class:
        cols = ["precision", "recall", "f1", "support"]
        rows = [[_fmt(name)] + [_fmt(v.get(k)) if isinstance(v, dict) else "—" for k in cols]
                for name, v in per_class.items()]
        lines += ["### Per class", "", *_table(["class", *cols], rows), ""]
    links = _pictures(r.get("pictures"), eval_dir)
    if links:
        lines += ["### Pictures", "", *[line + "\n" for line in links]]
    return lines


def _pictures(pictures, eval_dir: Path) -> list[str]:
    """Markdown image links, relative to ``eval_dir``, of the pictures that exist there."""
    links = []
    for kind, name in (pictures.items() if isinstance(pictures, dict) else ()):
        file = eval_dir / str(name)
        if file.is_file() and file.resolve().parent == eval_dir.resolve():
            target = file.name if " " not in file.name else f"<{file.name}>"
            links.append(f"![{kind}]({target})")
    return links


def write_summary(eval_dir: str | Path) -> Path:
    """Write ``eval_dir/summary.md`` from every ``eval_dir/*.json`` result; returns its path."""
    eval_dir = Path(eval_dir)
    results = _load_results(eval_dir)
    lines = [f"# Evaluation summary: {eval_dir.resolve().parent.name}/{eval_dir.name}", ""]
    if results:
        lines += [*_overview(results), ""]
        for stem, r in results:
            lines += _section(stem, r, eval_dir)
    else:
        lines += ["No evaluation results found.", ""]
    path = eval_dir / "summary.md"
    write_text_atomically(path, "\n".join(lines).rstrip() + "\n")
    return path
