"""``audioclr demo --out DIR``: demo corpus -> pretraining -> kNN of pretrained vs random init."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from dataio.errors import ConfigError, ManifestError, ShardWriteError
from dataio.reading.manifest import MANIFEST_NAME
from dataio.schema import cli_number
from dataio.writing.shard_pipeline import write_shards
from dataio.writing.sources.demo import RATE, demo_items, synth_loader
from trainer.commands import run_guarded
from trainer.evaluate.config import EvalRoot
from trainer.evaluate.run import run_eval
from trainer.objectives import OBJECTIVES
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import TrainingError, run

log = logging.getLogger("audioclr.demo")
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def make_corpus(out: Path, clips: int, seed: int, workers: int, overwrite: bool = False):
    return write_shards(demo_items(clips, seed=seed), out, dataset="demo", sample_rate=RATE,
                        shard_size=max(1, clips // 8), seed=seed, workers=workers,
                        loader=synth_loader, overwrite=overwrite)


def demo(out: Path, config: Path, clips: int, overrides: list[str], eval_overrides: list[str]) -> dict:
    t0 = time.time()
    corpus, run_dir = out / "corpus", out / "run"
    cfg = load_config(PretrainConfig, config, [f"data.shards={corpus}", f"run_dir={run_dir}", *overrides])
    eval_cfg = load_config(EvalRoot, None, eval_overrides).eval
    if (corpus / MANIFEST_NAME).is_file():
        log.info("reusing the demo corpus in %s", corpus)
    else:
        log.info("synthesizing %d clips into %s", clips, corpus)
        print(make_corpus(corpus, clips, cfg.seed, workers=2).summary())
    t1 = time.time()
    status = run(cfg)
    if status != "finished":
        raise TrainingError(f"pretraining was {status}; rerun the demo to resume it")
    t2 = time.time()
    trained = run_eval(run_dir, corpus, eval_cfg, overwrite=True)
    scratch = run_eval(run_dir, corpus, eval_cfg, random_init=True, overwrite=True)
    acc, acc0 = trained["metrics"]["class_averaged_accuracy"], scratch["metrics"]["class_averaged_accuracy"]
    summary = {"knn_accuracy": acc["mean"], "knn_accuracy_random_init": acc0["mean"],
               "knn_std": acc["std"], "knn_std_random_init": acc0["std"],
               "num_clips": trained["num_clips"], "num_classes": trained["num_classes"],
               "k": min(eval_cfg.knn.k, min(s["train"] for s in trained["round_sizes"].values())),
               "run_dir": str(run_dir), "corpus": str(corpus),
               "objective_read_labels": OBJECTIVES[cfg.objective.name].uses_labels,
               "trained_on": json.loads((run_dir / "encoder.json").read_text()).get("trained_on", {}),
               "seconds": {"corpus": round(t1 - t0, 1), "pretrain": round(t2 - t1, 1),
                           "eval": round(time.time() - t2, 1), "total": round(time.time() - t0, 1)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _labels_note(s: dict) -> str:
    if not s.get("objective_read_labels"):
        return ""
    return ("the objective read these clips' labels while pretraining: the score is a supervised upper "
            "reference, not transfer (audioclr bench quality pretrains it per held-out fold)\n")


def _threads_note(trained_on: dict) -> str:
    if trained_on.get("device") != "cpu":
        return ""
    n = trained_on.get("cpu_threads")
    return (f"pretrained on {n} CPU thread(s): the same seed on another thread count sums in another order "
            f"and ends with other weights (train.threads={n} repeats this run)\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="audioclr demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="folder for the corpus, the run and summary.json")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="pretraining recipe")
    p.add_argument("--clips", type=cli_number(int, 1), default=400, help="clips in the synthetic corpus")
    p.add_argument("overrides", nargs="*", help="pretraining overrides (train.epochs=2) and eval.* keys")
    args = p.parse_args(argv)
    eval_overrides = [o for o in args.overrides if o.startswith("eval.")]
    overrides = [o for o in args.overrides if not o.startswith("eval.")]

    def work() -> int:
        report(demo(Path(args.out), Path(args.config), args.clips, overrides, eval_overrides), Path(args.out))
        return 0
    return run_guarded("audioclr demo", work, input_errors=(ConfigError, ManifestError, ShardWriteError),
                       run_errors=(TrainingError,))


def report(s: dict, out: Path) -> None:
    """The demo's table, on stdout."""
    print(f"\nkNN class-averaged accuracy on the demo corpus ({s['num_classes']} classes, "
          f"{s['num_clips']} clips, leave-one-fold-out, k={s['k']}):\n"
          f"  pretrained encoder : {s['knn_accuracy']:.3f} +- {s['knn_std']:.3f}\n"
          f"  random init        : {s['knn_accuracy_random_init']:.3f} +- {s['knn_std_random_init']:.3f}\n"
          f"  chance             : {1 / s['num_classes']:.3f}\n"
          f"{_labels_note(s)}{_threads_note(s['trained_on'])}"
          f"wall time {s['seconds']['total']:.0f} s (pretraining {s['seconds']['pretrain']:.0f} s); "
          f"summary in {out / 'summary.json'}")
