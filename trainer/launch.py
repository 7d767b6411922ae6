"""``audioclr launch [torchrun options] pretrain --config X.yaml [a.b=v ...]``.

torchrun with audioclr's exit codes. Stock ``torchrun`` ends every failure with exit 1
and an error report of its own, whatever its workers said; this launcher runs the same
elastic agent (every torchrun option works: ``--nproc-per-node``, ``--nnodes``,
``--rdzv-endpoint``, ``--max-restarts`` ...) and exits as one process would:

- 0 when every rank finished; 2 for a bad config or bad shards (printed once, by rank 0);
- 1 for an error during training, naming the rank that failed;
- 130 after Ctrl-C and 143 after SIGTERM: every rank saves a checkpoint first.

With ``--max-restarts N`` a lost rank restarts the whole group, which resumes from the
last checkpoint; each attempt's ranks meet in a new store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
unless set): the agent's shared one keeps the dead attempt's addresses.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

COMMANDS = {"pretrain": "trainer.pretrain"}


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(torchrun options, module to run, its arguments)."""
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            return argv[:i], COMMANDS[arg], argv[i + 1:]
    raise ValueError("name the command to launch: audioclr launch [torchrun options] pretrain --config X.yaml ...")


def exit_code(worker_code: int) -> int:
    """A worker's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - worker_code if worker_code < 0 else worker_code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        options, module, rest = split_argv(argv)
    except ValueError as err:
        print(f"audioclr launch: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see the module's docstring
    args = get_args_parser().parse_args([*options, "-m", module, *rest])
    config, cmd, cmd_args = config_from_args(args)
    # the agent's own failure report repeats what the ranks printed; ours is one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code(failure.exitcode)
        if code not in (2, 128 + signal.SIGINT, 128 + signal.SIGTERM):
            print(f"audioclr launch: rank {rank} failed first (exit {code}; its message is above)", file=sys.stderr)
        return code
    except SignalException as err:  # the agent itself was signalled: the ranks got it too and saved
        return 128 + int(err.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
