"""``audioclr eval --run RUN_DIR --data SHARDS --protocol knn|linear|finetune [eval.a.b=v ...]``.

Writes ``RUN_DIR/eval/<DATA SET>/<protocol>[_random_init].json`` (the data set is the shard
folder's name; an earlier result gets a ``-2``, ``-3`` ... sibling unless ``--overwrite``), the
pictures (learning curves, confusion matrix, t-SNE) next to it and ``summary.md`` over every
result of that data set.
"""

from __future__ import annotations

import logging
import math
import sys

from dataio.errors import ConfigError
from trainer.commands import INPUT_ERRORS, config_parser, print_help_config, run_guarded
from trainer.evaluate.config import PROTOCOLS, EvalRoot
from trainer.evaluate.protocols import FROZEN
from trainer.evaluate.protocols import protocol as protocol_named
from trainer.evaluate.run import headline, run_eval
from trainer.models.export import CheckpointError
from trainer.parallel import distributed
from trainer.parallel.device import pick_device
from trainer.train.config import load_config

log = logging.getLogger("audioclr.eval")

def main(argv: list[str] | None = None) -> int:
    p = config_parser("audioclr eval", __doc__, "YAML with an eval: section (e.g. the best.yaml of a sweep)",
                      "eval.knn.k=20 eval.finetune.lr=3e-4 ...")
    p.add_argument("--run", help="run directory holding encoder.safetensors + encoder.json (required)")
    p.add_argument("--data", help="labelled shard folder with manifest.json (required)")
    p.add_argument("--protocol", default="knn", choices=PROTOCOLS)
    p.add_argument("--random-init", action="store_true", help="the architecture at random init (scratch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result of the same data set and protocol (default: a new -N suffix)")
    args = p.parse_args(argv)
    if args.help_config:
        return print_help_config(EvalRoot)
    if not args.run or not args.data:
        p.error("--run and --data are required")

    def work() -> int:
        cfg = load_config(EvalRoot, args.config, args.overrides).eval
        if distributed.env_info().world_size > 1 and not protocol_named(args.protocol).frozen:
            raise ConfigError(f"audioclr launch ... eval splits the embedding pass of {' and '.join(FROZEN)} over "
                              f"ranks; run --protocol {args.protocol} as one process (audioclr eval)")
        info = distributed.init(pick_device(cfg.device, key="eval.device").type)  # a group only under launch
        try:
            result = run_eval(args.run, args.data, cfg, args.protocol, args.random_init, args.overwrite)
        finally:
            distributed.close()
        if not info.is_main:
            return 0
        print(headline(result))
        if not math.isfinite(result["metrics"][result["primary_metric"]]["mean"]):
            log.warning("the metric is not finite (a class without test clips?)")
        print(f"results in {result['file']}")
        return 0

    return run_guarded("audioclr eval", work, input_errors=(*INPUT_ERRORS, CheckpointError),
                       run_errors=(FloatingPointError,),
                       on_interrupt="stopped; nothing was written for this evaluation (results are written at its end)")


if __name__ == "__main__":
    import sys

    sys.exit(main())
