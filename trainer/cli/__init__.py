"""The ``audioclr`` command: one entry point, one sub-command per task (``python -m trainer.cli``).

Each command's own module sits beside this one (``pretrain``, ``launch``, ``eval``, ``tune``,
``demo``; ``bench`` is :mod:`trainer.bench`); what they share is :mod:`trainer.commands`."""

from __future__ import annotations

import argparse
import difflib
import sys

# Each command imports its own modules inside its function below, so that `audioclr --help` and
# the dispatch itself never import torch or a command's dependencies.


def _demo_corpus(argv: list[str]) -> int:
    from dataio.schema import cli_number

    p = argparse.ArgumentParser(prog="audioclr demo-corpus",
                                description="Synthesize the embedded labelled demo corpus as shards.")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--clips", type=cli_number(int, 1), default=400, help="number of clips (1-5 s each)")
    p.add_argument("--seed", type=cli_number(int, 0), default=0)
    p.add_argument("--workers", type=cli_number(int, 0), default=0, help="processes (0 = all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    from dataio.errors import ShardWriteError
    from trainer.cli.demo import make_corpus
    from trainer.commands import run_guarded

    def work() -> int:
        print(make_corpus(args.out, args.clips, args.seed, args.workers, args.overwrite).summary())
        return 0
    return run_guarded("audioclr demo-corpus", work, input_errors=(ShardWriteError,))


def _shard(argv: list[str]) -> int:
    from dataio.writing.shard_cli import (
        SHARD_INPUT_ERRORS,
        add_convert_arguments,
        add_shard_arguments,
        run_convert,
        run_shard,
    )
    from trainer.commands import run_guarded

    if argv[:1] == ["convert"]:
        p = argparse.ArgumentParser(prog="audioclr shard convert", description="Re-encode a shard corpus in "
                                    "another clip format (flac <-> pcm16 losslessly, or to logmel).")
        add_convert_arguments(p)
        args = p.parse_args(argv[1:])
        return run_guarded("audioclr shard convert", lambda: run_convert(args), input_errors=SHARD_INPUT_ERRORS)
    p = argparse.ArgumentParser(prog="audioclr shard", description="Write audio files as WebDataset shards "
                                "(`audioclr shard convert --help`: re-encode a corpus in another clip format).")
    add_shard_arguments(p)
    args = p.parse_args(argv)
    return run_guarded("audioclr shard", lambda: run_shard(args), input_errors=SHARD_INPUT_ERRORS)


def _check_shards(argv: list[str]) -> int:
    from dataio.errors import ManifestError
    from dataio.reading.check_shards import check_all, parse_args
    from trainer.commands import run_guarded

    args = parse_args(argv)
    return run_guarded("audioclr check-shards", lambda: check_all(args), input_errors=(ManifestError,))


def _bench(argv: list[str]) -> int:
    name = argv[0] if argv else ""
    if name == "data":
        from trainer.bench.data import main
    elif name == "train":
        from trainer.bench.train import main
    elif name == "quality":
        from trainer.bench.quality import main
    elif name == "memory":
        from trainer.bench.memory import main
    elif name == "gradcache":
        from trainer.bench.gradcache import main
    elif name == "scale":
        from trainer.bench.scale import main
    else:
        print("usage: audioclr bench data|train|quality|memory|gradcache|scale [--help]", file=sys.stderr)
        return 2
    return main(argv[1:])


def _pretrain(argv: list[str]) -> int:
    from trainer.cli.pretrain import main
    return main(argv)


def _launch(argv: list[str]) -> int:
    from trainer.cli.launch import main
    return main(argv)


def _eval(argv: list[str]) -> int:
    from trainer.cli.eval import main
    return main(argv)


def _tune(argv: list[str]) -> int:
    from trainer.cli.tune import main
    return main(argv)


def _demo(argv: list[str]) -> int:
    from trainer.cli.demo import main
    return main(argv)


COMMANDS = {
    "demo-corpus": (_demo_corpus, "synthesize the embedded default corpus as shards"),
    "shard": (_shard, "write audio files (folder or csv layout) as WebDataset shards"),
    "check-shards": (_check_shards, "decode every clip of a shard folder and list the broken ones"),
    "pretrain": (_pretrain, "contrastive pretraining from a YAML recipe"),
    "launch": (_launch, "torchrun with audioclr's exit codes: launch [torchrun options] pretrain ..."),
    "eval": (_eval, "evaluate a run's exported encoder: knn, linear probe or fine-tuning, with pictures"),
    "tune": (_tune, "Ray Tune sweep of the downstream evaluation (alpha, temperature, lr, k ...)"),
    "demo": (_demo, "demo corpus -> pretraining -> kNN evaluation, on CPU in minutes"),
    "bench": (_bench, "benchmarks: `bench data` (the back ends against the decode limit), `train` (the step "
              "against a bare PyTorch loop), `quality` (pretraining scored on real labelled audio), `memory` "
              "(each rank's model state under DDP and ZeRO), `gradcache` (a step's peak memory with gradient "
              "caching), `scale` (costs as the corpus grows)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: audioclr COMMAND [ARGS]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<12} {doc}")
        print("\n`audioclr COMMAND --help` tells more.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, list(COMMANDS), n=1)
        print(f"audioclr: unknown command '{name}'" + (f" (did you mean '{near[0]}'?)" if near else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from trainer.commands import STOPPED, report_stop, sigterm_stops, track_line_ends
    track_line_ends()
    try:  # a stop while a command parses its options, before its own guard runs
        with sigterm_stops():
            return COMMANDS[name][0](rest)
    except KeyboardInterrupt as err:
        return report_stop(f"audioclr {name}", err, STOPPED)

