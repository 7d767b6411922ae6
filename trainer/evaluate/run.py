"""``audioclr eval --run RUN_DIR --data SHARDS --protocol knn [eval.k=20 ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dataio.manifest import ManifestError, load_manifest
from dataio.schema import ConfigError, check, option
from trainer.checkpoint import build_from_meta, load_encoder
from trainer.config import load_config
from trainer.evaluate.embed import ClipEmbeddings, embed_shards
from trainer.evaluate.knn import knn_scores
from trainer.evaluate.metrics import class_averaged_accuracy

log = logging.getLogger("audioclr.eval")
PROTOCOLS = ("knn",)


@dataclass
class EvalConfig:
    k: int = option(200, "neighbours (capped by the number of training clips)")
    temperature: float = option(0.07, "temperature of the exp(similarity / T) vote weights")
    aggregate: str = option("mean", "clip = mean of patch embeddings, or vote of its patches",
                            ("mean", "vote"))
    patch_seconds: float = option(0.0, "patch length, s; 0 = the encoder's training view length")
    hop_seconds: float = option(0.0, "hop between patches, s; 0 = half a patch")
    split: str = option("auto", "auto: folds if the shards have them, else their train/test split, "
                        "else a seeded random split", ("auto", "folds", "split", "random"))
    test_fraction: float = option(0.2, "test share of the seeded random split")
    seed: int = option(0, "seed of the random split and of random-init encoders")
    batch_size: int = option(128, "patches per encoder call")
    device: str = option("auto", "auto = cuda when available", ("auto", "cpu", "cuda"))

    def __post_init__(self) -> None:
        check(self.k > 0, "k", "must be positive")
        check(self.temperature > 0, "temperature", "must be positive")
        check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        check(self.patch_seconds >= 0 and self.hop_seconds >= 0, "patch_seconds", "must be >= 0")


@dataclass
class EvalRoot:
    eval: EvalConfig = option(EvalConfig(), "evaluation settings")


def splits_of(emb: ClipEmbeddings, how: str, test_fraction: float, seed: int) -> list[tuple[str, np.ndarray]]:
    """(name, boolean test mask) per evaluation round over the labelled clips."""
    labelled = emb.labels >= 0
    has_folds = bool((emb.folds[labelled] > 0).all()) and len(np.unique(emb.folds[labelled])) > 1
    has_split = {"train", "test"} <= set(np.asarray(emb.splits)[labelled])
    if how == "auto":
        how = "folds" if has_folds else "split" if has_split else "random"
    if how == "folds":
        if not has_folds:
            raise ValueError("eval.split=folds, but the shards' clips carry no folds")
        return [(f"fold{f}", emb.folds == f) for f in np.unique(emb.folds[labelled])]
    if how == "split":
        if not has_split:
            raise ValueError("eval.split=split, but the shards have no 'train' and 'test' clips")
        return [("test", np.asarray(emb.splits) == "test")]
    rng = np.random.default_rng(seed)
    test = np.zeros(len(emb.labels), dtype=bool)
    for c in np.unique(emb.labels[labelled]):  # stratified: each class split alike
        rows = np.flatnonzero(emb.labels == c)
        rng.shuffle(rows)
        test[rows[:max(1, int(round(len(rows) * test_fraction)))]] = True
    return [("random", test)]


def knn_round(emb: ClipEmbeddings, test_mask: np.ndarray, cfg: EvalConfig, num_classes: int) -> float:
    """Class-averaged accuracy on the clips of ``test_mask`` with the rest as the bank."""
    labelled = emb.labels >= 0
    train_rows, test_rows = np.flatnonzero(labelled & ~test_mask), np.flatnonzero(labelled & test_mask)
    if cfg.aggregate == "mean":
        means = emb.clip_means()
        scores = knn_scores(means[train_rows], emb.labels[train_rows], means[test_rows], num_classes,
                            k=cfg.k, temperature=cfg.temperature)
    else:
        unit = emb.patches / (np.linalg.norm(emb.patches, axis=1, keepdims=True) + 1e-12)
        in_train, in_test = np.isin(emb.owner, train_rows), np.isin(emb.owner, test_rows)
        patch_scores = knn_scores(unit[in_train], emb.labels[emb.owner[in_train]], unit[in_test],
                                  num_classes, k=cfg.k, temperature=cfg.temperature)
        sums = np.zeros((len(emb.labels), num_classes))
        np.add.at(sums, emb.owner[in_test], patch_scores)
        scores = sums[test_rows]
    return class_averaged_accuracy(emb.labels[test_rows], scores.argmax(axis=1))


def evaluate_knn(encoder: torch.nn.Module, frontend, view_seconds: float, data: str | Path,
                 cfg: EvalConfig) -> dict:
    """kNN evaluation of ``encoder`` on the labelled shards in ``data``."""
    manifest = load_manifest(data)
    if manifest.sample_rate != frontend.sample_rate:
        raise ConfigError(f"the shards in {data} are at {manifest.sample_rate} Hz but the encoder "
                          f"was trained on {frontend.sample_rate} Hz: re-shard with --sample-rate")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    patch = cfg.patch_seconds or view_seconds
    emb = embed_shards(encoder, frontend, manifest, patch_seconds=patch,
                       hop_seconds=cfg.hop_seconds or patch / 2, batch_size=cfg.batch_size, device=device)
    num_classes = max(len(manifest.vocabulary), int(emb.labels.max()) + 1)
    rounds = {name: knn_round(emb, mask, cfg, num_classes)
              for name, mask in splits_of(emb, cfg.split, cfg.test_fraction, cfg.seed)}
    accs = np.array(list(rounds.values()))
    return {"protocol": "knn", "data": str(data), "num_clips": int((emb.labels >= 0).sum()),
            "num_classes": num_classes, "k": min(cfg.k, int((emb.labels >= 0).sum())),
            "class_averaged_accuracy": float(accs.mean()), "std": float(accs.std()),
            "rounds": rounds, "settings": asdict(cfg)}


def write_result(run_dir: str | Path, name: str, result: dict) -> Path:
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path


def run_eval(run_dir: str | Path, data: str | Path, cfg: EvalConfig, random_init: bool = False) -> dict:
    """Evaluate the exported encoder of ``run_dir`` (or the same architecture at random
    init) and write ``run_dir/eval/knn[_random_init].json``."""
    encoder, frontend, meta = load_encoder(run_dir)
    if random_init:
        torch.manual_seed(cfg.seed)
        encoder, frontend = build_from_meta(meta)
    result = evaluate_knn(encoder, frontend, meta["view_seconds"], data, cfg)
    result["encoder"] = "random_init" if random_init else str(run_dir)
    write_result(run_dir, "knn_random_init" if random_init else "knn", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr eval", description=__doc__)
    p.add_argument("--run", required=True, help="run directory holding encoder.safetensors + encoder.json")
    p.add_argument("--data", required=True, help="labelled shard folder (with manifest.json)")
    p.add_argument("--protocol", default="knn", choices=PROTOCOLS)
    p.add_argument("--random-init", action="store_true", help="evaluate the architecture at random init")
    p.add_argument("overrides", nargs="*", help="eval.k=20 eval.aggregate=vote ...")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(EvalRoot, None, args.overrides).eval
        result = run_eval(args.run, args.data, cfg, args.random_init)
    except (ConfigError, ManifestError, FileNotFoundError, ValueError) as err:
        print(f"audioclr eval: error: {err}", file=sys.stderr)
        return 2
    print(f"kNN class-averaged accuracy: {result['class_averaged_accuracy']:.4f} "
          f"(+- {result['std']:.4f} over {len(result['rounds'])} round(s), k={result['k']})")
    return 0
