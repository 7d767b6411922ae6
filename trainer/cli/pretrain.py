"""Contrastive pretraining: ``audioclr pretrain --config X.yaml [a.b=v ...]``.

Also ``python -m trainer.cli.pretrain`` and ``torchrun ... -m trainer.cli.pretrain``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dataio.augment import describe_ops
from dataio.errors import ConfigError, DataError, ManifestError
from dataio.schema import cli_number
from trainer.cli.launch import stop_with_launcher
from trainer.commands import config_parser, print_help_config, run_guarded
from trainer.parallel import distributed
from trainer.safe_files import CheckpointError
from trainer.train.config import PretrainConfig, load_config
from trainer.train.loop import TrainingError, run_trainer

log = logging.getLogger("audioclr.pretrain")

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = config_parser("audioclr pretrain", __doc__, "YAML recipe (configs/*.yaml)",
                      "dotted overrides, e.g. optim.lr=0.1 train.epochs=5")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", type=cli_number(int, 0), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = distributed.env_info()
    rank = info.rank
    if args.help_config:
        return print_help_config(PretrainConfig, *describe_ops())

    def work() -> int:
        stop_with_launcher()
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        status, stopped_by = run_trainer(cfg)
        if status == "interrupted":  # _interrupted() said so, in the one line that tells how to go on
            return 128 + stopped_by
        # a stop that came after the last step found the work done: it ends as done
        late = f" ({signal.Signals(stopped_by).name} came after the last step)" if stopped_by else ""
        log.info("pretraining finished: %s%s", cfg.run_dir, late)
        return 0

    # errors every rank meets alike (a config, a NaN loss) are printed by rank 0 only;
    # one rank's data or disk: that rank says so
    return run_guarded("audioclr pretrain", work, input_errors=(ConfigError, ManifestError, ValueError),
                       run_errors=(TrainingError,), quiet=rank != 0, rank=rank, world_size=info.world_size,
                       own_errors=(DataError, CheckpointError, distributed.PeerLost),
                       on_interrupt="error: interrupted before a checkpoint could be saved")


if __name__ == "__main__":
    sys.exit(main())
