"""The learning-quality benchmark: does pretraining learn what a linear probe can use?

``audioclr bench quality --csv path,label,fold.csv --config configs/demo.yaml [--epochs N | --minutes M]``

On any labelled set with folds it shards the audio (once), pretrains the recipe for each
seed, and scores by leave-one-fold-out, on the same folds:

- the pretrained encoder: linear probe and kNN;
- the same architecture at random init: linear probe and kNN (the bar pretraining must clear);
- hand-crafted features: per-band mean and std of the log-mel and of 20 MFCCs over the
  clip, standardised, multinomial logistic regression.

With ``--format pcm16|logmel`` pretraining reads the shards converted to that clip
format (logmel with the recipe's front end); evaluation and the baselines read the
audio shards as before, so the scores say what the format changes in learning.

The table goes to the screen, everything to ``OUT/quality.json``, with the wall times.
Evaluation patches have a fixed length (``--patch-seconds``), independent of the
recipe's view length, so changing the recipe never moves the baselines.

An objective that learns from the labels (supcon, hybrid) would have seen the test
clips' labels if it pretrained on the whole set: with ``--csv`` it is pretrained once
per fold, on the other folds' clips only, and each encoder is scored on the fold it
never saw (4 folds: 4 pretrainings of three quarters of the set per seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from dataio.atomic import write_text_atomically
from dataio.errors import ConfigError, DataError, ManifestError
from dataio.formats import FORMATS
from dataio.formats.logmel import frontend_record
from dataio.frontend import FrontendConfig, LogMel
from dataio.reading.manifest import MANIFEST_NAME, load_manifest
from dataio.schema import cli_number
from dataio.writing.convert import convert_corpus
from dataio.writing.shard_pipeline import write_shards
from dataio.writing.shard_writer import Encoding
from dataio.writing.sources import load_layout
from trainer.commands import run_guarded
from trainer.evaluate.clips import load_clipset
from trainer.evaluate.config import EvalRoot
from trainer.evaluate.metrics import class_averaged_accuracy
from trainer.evaluate.protocol import make_rounds
from trainer.evaluate.run import run_eval
from trainer.objectives import OBJECTIVES
from trainer.train.config import PretrainConfig, load_config, to_dict
from trainer.train.loop import TrainingError
from trainer.train.loop import run as pretrain_run

log = logging.getLogger("audioclr.bench.quality")
PROTOCOLS = ("linear", "knn")


def shard_csv(csv: Path, out: Path, sample_rate: int, drop_fold: int = 0) -> Path:
    """Shards of the CSV's clips in ``out`` (rewritten only when the CSV changes), without
    the clips of fold ``drop_fold`` where it is set (the vocabulary stays the whole set's)."""
    stamp = hashlib.sha256(csv.read_bytes()).hexdigest()[:16] + f"-{sample_rate}"
    stamp += f"-without-fold{drop_fold}" if drop_fold else ""
    marker = out / "source.txt"
    if (out / MANIFEST_NAME).is_file() and marker.is_file() and marker.read_text() == stamp:
        return out
    listing = load_layout("csv", csv)
    if not listing.items:
        raise ConfigError(f"--csv {csv}: no audio clip listed there was found")
    vocabulary = listing.vocabulary or sorted({label for item in listing.items for label in item.labels})
    items = [item for item in listing.items if not drop_fold or item.fold != drop_fold]
    write_shards(items, out, dataset=csv.stem, sample_rate=sample_rate, shard_size=0, shard_bytes=0,
                 seed=0, workers=0, min_seconds=0.01, overwrite=True, vocabulary=vocabulary,
                 progress=False)
    marker.write_text(stamp)
    return out


def shards_without_each_fold(csv: Path, out: Path, sample_rate: int) -> dict[int, Path]:
    """Fold number -> shards of the CSV's other folds (for objectives that read labels)."""
    folds = [item.fold for item in load_layout("csv", csv).items]
    if None in folds or len(set(folds)) < 2:
        raise ConfigError(f"--csv {csv}: an objective that learns from labels is pretrained once per held-out "
                          "fold, which needs a fold for every clip and two or more folds")
    return {f: shard_csv(csv, out / f"shards-without-fold{f}", sample_rate, drop_fold=f) for f in sorted(set(folds))}


def training_shards(shards: Path, clip_format: str, frontend, out: Path) -> Path:
    """``shards`` in ``clip_format`` for pretraining: the folder itself, or its conversion
    in ``out`` (converted again only when the shards or the front end change)."""
    if clip_format == load_manifest(shards).clip_format:
        return shards
    encoding = Encoding.named(clip_format, frontend)
    record = frontend_record(frontend) if encoding.frontend else {}
    stamp = hashlib.sha256((shards / MANIFEST_NAME).read_bytes() + json.dumps(record).encode()).hexdigest()[:16]
    marker = out / "source.txt"
    if (out / MANIFEST_NAME).is_file() and marker.is_file() and marker.read_text() == stamp:
        return out
    convert_corpus(shards, str(out), encoding, overwrite=True,
                   progress=False)
    marker.write_text(stamp)
    return out


def handcrafted_features(clips, sample_rate: int) -> np.ndarray:
    """[N, 168] per clip: mean and std over time of a 64-band log-mel (dB, 25 ms / 10 ms)
    and of its first 20 DCT coefficients (MFCCs)."""
    front = FrontendConfig(sample_rate=sample_rate, n_mels=64, norm_mean=0.0, norm_std=1.0)
    logmel = LogMel(front)
    dct = torch.from_numpy(_dct_matrix(64, 20))
    rows = []
    for _, wave in clips.waves(range(len(clips))):  # each clip decoded as it is reached
        if len(wave) < front.win_length:
            wave = np.pad(wave, (0, front.win_length - len(wave)))
        mel = logmel(torch.from_numpy(wave))[0]  # [F, T] dB
        mfcc = dct @ mel
        rows.append(torch.cat([mel.mean(1), mel.std(1, unbiased=False), mfcc.mean(1),
                               mfcc.std(1, unbiased=False)]).numpy())
    return np.stack(rows)


def _dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II rows [n_out, n_in]."""
    k, n = np.arange(n_out)[:, None], np.arange(n_in)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


def handcrafted_baseline(shards: Path, seed: int = 0) -> dict:
    """Leave-one-fold-out class-averaged accuracy of logistic regression on hand-crafted features."""
    from sklearn.linear_model import LogisticRegression  # deferred: scikit-learn is slow to import
    from sklearn.preprocessing import StandardScaler

    clips = load_clipset(load_manifest(shards))
    feats = handcrafted_features(clips, clips.sample_rate)
    scores = []
    for rnd in make_rounds(clips, "folds", test_fraction=0.2, val_fraction=0.0, seed=seed, max_rounds=0):
        scaler = StandardScaler().fit(feats[rnd.train])
        model = LogisticRegression(max_iter=5000, C=1.0, random_state=seed)
        model.fit(scaler.transform(feats[rnd.train]), clips.labels[rnd.train])
        predicted = model.predict(scaler.transform(feats[rnd.test]))
        scores.append(class_averaged_accuracy(clips.labels[rnd.test], predicted))
    return {"class_averaged_accuracy": float(np.mean(scores)), "folds": [float(s) for s in scores]}


def seconds_per_epoch(config: str, shards: Path, out: Path, overrides: list[str], epochs: int = 3) -> float:
    """Wall seconds one epoch of the recipe takes here, from a short run (its first
    epoch, which pays for start-up, is left out)."""
    cfg = load_config(PretrainConfig, config, [*overrides, f"data.shards={shards}", f"run_dir={out}",
                                               f"train.epochs={epochs}", "train.log_every=1",
                                               "train.resume=none", "train.progress=false"])
    pretrain_run(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "elapsed" in r]  # step records, not the per-epoch clip counts
    per_epoch = len(records) // epochs
    first, last = records[per_epoch - 1], records[-1]
    return (last["elapsed"] - first["elapsed"]) / (epochs - 1)


def pretrain(config: str, shards: Path, run_dir: Path, seed: int, epochs: int, overrides: list[str]) -> float:
    """Pretrain (or finish pretraining) one seed; returns the wall seconds spent now."""
    if (run_dir / "encoder.json").is_file():
        return 0.0
    cfg = load_config(PretrainConfig, config, [*overrides, f"seed={seed}", f"data.shards={shards}",
                                               f"run_dir={run_dir}", f"train.epochs={epochs}"])
    start = time.perf_counter()
    if pretrain_run(cfg) != "finished":
        raise TrainingError(f"pretraining {run_dir} was interrupted; rerun the benchmark to resume it")
    return time.perf_counter() - start


def evaluate(run_dir: Path, shards: Path, seed: int, patch_seconds: float, random_inits=(False, True),
             folds: tuple[int, ...] = ()) -> dict:
    """Fold-mean class-averaged accuracy of each protocol, pretrained and at random init
    (of the rounds testing ``folds`` only, where given)."""
    cfg = load_config(EvalRoot, None, [f"eval.seed={seed}", f"eval.patch_seconds={patch_seconds}",
                                       "eval.split=folds", "eval.pictures=false",
                                       f"eval.folds=[{','.join(map(str, folds))}]"]).eval
    out = {}
    for protocol in PROTOCOLS:
        for random_init in random_inits:
            result = run_eval(run_dir, shards, cfg, protocol, random_init, overwrite=True)
            metric = result["metrics"]["class_averaged_accuracy"]
            out[f"{protocol}{'_random_init' if random_init else ''}"] = {
                "mean": metric["mean"], "std": metric["std"],
                "folds": [r["class_averaged_accuracy"] for r in result["rounds"].values()]}
    return out


def pretrain_per_fold(args: argparse.Namespace, by_fold: dict[int, Path], shards: Path, seed: int,
                      epochs: int, frontend) -> tuple[float, dict]:
    """An objective that reads labels: one encoder per held-out fold, pretrained on the
    other folds, scored on that fold alone. Returns the wall seconds and the scores."""
    out, spent, fold_scores = Path(args.out), 0.0, {p: [] for p in PROTOCOLS}
    for fold, fold_shards in by_fold.items():
        run_dir = out / f"seed{seed}" / f"without-fold{fold}"
        train_on = training_shards(fold_shards, args.format or load_manifest(fold_shards).clip_format, frontend,
                                   out / f"shards-without-fold{fold}-{args.format}")
        spent += pretrain(args.config, train_on, run_dir, seed, epochs, args.overrides)
        scores = evaluate(run_dir, shards, seed, args.patch_seconds, random_inits=(False,), folds=(fold,))
        for protocol in PROTOCOLS:
            fold_scores[protocol] += scores[protocol]["folds"]
    result = {p: {"mean": float(np.mean(v)), "std": float(np.std(v)), "folds": v} for p, v in fold_scores.items()}
    result.update(evaluate(run_dir, shards, seed, args.patch_seconds, random_inits=(True,)))  # any fold's architecture
    return spent, result


def online_curve(run_dir: Path) -> list[list[float]]:
    """[[epoch, online kNN], ...] of a run trained with the online probe (``--online-every``)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [[r["epoch"], r["online_knn"]] for r in records if "online_knn" in r]


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean and std over seeds of each fold-mean score."""
    keys = next(iter(per_seed.values())).keys()
    out = {}
    for key in keys:
        values = [s[key]["mean"] for s in per_seed.values()]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "seeds": values}
    return out


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = load_config(PretrainConfig, args.config, ["data.shards=unused", *args.overrides])
    per_fold = OBJECTIVES[base.objective.name].uses_labels
    if per_fold and not args.csv:
        raise ConfigError(f"objective {base.objective.name} learns from labels: bench quality pretrains it once "
                          "per held-out fold on shards of the other folds, which it writes from --csv; give --csv")
    if per_fold and args.online_every:
        raise ConfigError(f"--online-every with objective {base.objective.name}: each encoder saw the labels of "
                          "all but one fold, so an online score over every fold would test on its training labels")
    if args.csv:
        shards = shard_csv(Path(args.csv), out / "shards", base.frontend.sample_rate)
    else:
        shards = Path(args.shards)
    manifest = load_manifest(shards)
    train_on = training_shards(shards, args.format or manifest.clip_format, base.frontend,
                               out / f"shards-{args.format}")
    epochs = args.epochs or base.train.epochs
    timing = {}
    if args.minutes:
        per_epoch = seconds_per_epoch(args.config, train_on, out / "calibration", args.overrides)
        epochs = max(1, int(args.minutes * 60 // per_epoch))
        timing["calibrated_seconds_per_epoch"] = per_epoch
        log.info("%.1f s per epoch here: %d epochs fit in %.1f min", per_epoch, epochs, args.minutes)
    per_seed, pretrain_seconds, curves, trained = {}, {}, {}, {}
    by_fold = shards_without_each_fold(Path(args.csv), out, base.frontend.sample_rate) if per_fold else {}
    probe = [f"eval.online={shards}", f"eval.every={args.online_every}",
             f"eval.patch_seconds={args.patch_seconds}"] if args.online_every else []
    for seed in args.seeds:
        run_dir = out / f"seed{seed}"
        if per_fold:
            pretrain_seconds[seed], per_seed[seed] = pretrain_per_fold(args, by_fold, shards, seed, epochs,
                                                                       base.frontend)
            trained[str(seed)] = trained_on(next(out.glob(f"seed{seed}/without-fold*")))
            continue
        pretrain_seconds[seed] = pretrain(args.config, train_on, run_dir, seed, epochs, [*args.overrides, *probe])
        per_seed[seed] = evaluate(run_dir, shards, seed, args.patch_seconds)
        curves[str(seed)] = online_curve(run_dir)
        trained[str(seed)] = trained_on(run_dir)
    hand = handcrafted_baseline(shards)
    timing.update(pretrain_seconds=pretrain_seconds, total_seconds=time.perf_counter() - started)
    result = {"data": str(args.csv or args.shards), "shards": str(shards), "clips": manifest.num_clips,
              "classes": len(manifest.vocabulary), "config": args.config, "overrides": args.overrides,
              "recipe": to_dict(base),  # as resolved when the benchmark ran (a recipe file can change later)
              "epochs": epochs, "seeds": args.seeds, "pretrained_per_fold": per_fold,
              "patch_seconds": args.patch_seconds,
              "train_format": load_manifest(train_on).clip_format,
              "summary": summarise(per_seed), "per_seed": {str(k): v for k, v in per_seed.items()},
              "handcrafted": hand, "timing": timing, "online_curves": curves, "trained_on": trained}
    write_text_atomically(out / "quality.json", json.dumps(result, indent=1))
    return result


def trained_on(run_dir: Path) -> dict:
    """Where a run's encoder was trained (device, CPU threads, ranks, autocast): on a CPU the
    thread count and precision decide the last bits of every step, so the score too."""
    return json.loads((run_dir / "encoder.json").read_text()).get("trained_on", {})


def describe_trained_on(trained: dict) -> str:
    """One line for the seeds' ``trained_on`` records."""
    kinds = {json.dumps(v, sort_keys=True) for v in trained.values()}
    if not trained:
        return "trained on: (reused runs, not recorded)"
    parts = []
    for kind in sorted(kinds):
        v = json.loads(kind)
        seeds = ",".join(s for s, t in trained.items() if json.dumps(t, sort_keys=True) == kind)
        parts.append(f"{v.get('device', '?')}, {v.get('cpu_threads', '?')} thread(s), {v.get('world_size', '?')} "
                     f"rank(s), {v.get('autocast', 'precision not recorded')} (seed {seeds})")
    return "trained on " + "; ".join(parts)


def print_table(result: dict) -> None:
    s = result["summary"]
    hand = result["handcrafted"]["class_averaged_accuracy"]
    seeds = ",".join(map(str, result["seeds"]))
    print(f"\nlearning quality on {result['data']} ({result['clips']} clips, {result['classes']} classes, "
          f"leave-one-fold-out, class-averaged accuracy)\nrecipe {result['config']} "
          f"{' '.join(result['overrides'])}, {result['epochs']} epochs, seeds {seeds} (mean +- std over seeds), "
          f"pretrained from {result.get('train_format', 'flac')} shards")
    if result.get("pretrained_per_fold"):
        print("  the objective reads labels: one encoder per held-out fold, pretrained on the other folds")
    print(f"  {'encoder':<28}{'linear probe':>16}{'kNN':>16}")
    for name, key in (("pretrained", ""), ("random init", "_random_init")):
        lin, knn = s[f"linear{key}"], s[f"knn{key}"]
        print(f"  {name:<28}{lin['mean']:>9.3f} +- {lin['std']:.3f}{knn['mean']:>9.3f} +- {knn['std']:.3f}")
    print(f"  {'hand-crafted + logistic reg.':<28}{hand:>9.3f}")
    gain = s["linear"]["mean"] - s["linear_random_init"]["mean"]
    minutes = [v / 60 for v in result["timing"]["pretrain_seconds"].values() if v]
    spent = f"{np.mean(minutes):.1f} min per seed" if minutes else "reused"
    print(f"  pretrained - random init (linear): {gain:+.3f}; pretraining {spent}; "
          f"total {result['timing']['total_seconds'] / 60:.1f} min")
    print(f"  {describe_trained_on(result.get('trained_on', {}))}")
    for seed, curve in result.get("online_curves", {}).items():
        if curve:
            print(f"  online kNN, seed {seed}: " + "  ".join(f"ep {e:g} {v:.3f}" for e, v in curve))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="path,label,fold CSV of labelled audio (paths relative to the CSV)")
    src.add_argument("--shards", help="a labelled shard folder with folds instead of --csv")
    p.add_argument("--config", required=True, help="pretraining recipe")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=cli_number(int, 0), default=0,
                        help="pretraining epochs (default: the recipe's)")
    budget.add_argument("--minutes", type=cli_number(float, 0), default=0.0,
                        help="pretraining time budget per seed: epochs are set from a short timed run")
    p.add_argument("--seeds", default="0", help="comma-separated pretraining seeds, e.g. 0,1")
    p.add_argument("--patch-seconds", type=cli_number(float, 0, above=True), default=1.0,
                   help="evaluation patch length, s")
    p.add_argument("--format", default="", choices=("", *FORMATS),
                   help="pretrain from the shards converted to this clip format (evaluation reads the audio)")
    p.add_argument("--online-every", type=cli_number(int, 0), default=0,
                   help="score kNN on the set every N epochs while pretraining (the online probe) and show the curve")
    p.add_argument("--out", default="runs/quality", help="folder for shards, runs and quality.json")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optim.lr=0.05 augment.rrc.p=0")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")

    def work() -> int:
        if args.epochs < 0 or args.minutes < 0 or not args.seeds or not math.isfinite(args.minutes):
            raise ConfigError("--epochs and --minutes must be positive and --seeds not empty")
        print_table(run(args))
        print(f"results in {Path(args.out) / 'quality.json'}")
        return 0
    # interrupted (SIGTERM: checkpoint saved), a non-finite loss, unreadable data: exit 1
    return run_guarded("audioclr bench quality", work, input_errors=(ConfigError, ManifestError, ValueError,
                                                                     FileNotFoundError),
                       run_errors=(TrainingError, DataError))
