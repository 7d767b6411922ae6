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
import threading
import time

from dataio.backends.torch_pipeline import die_with_parent
from dataio.errors import ConfigError
from trainer.commands import CommandFailed, run_guarded

COMMANDS = {"pretrain": "trainer.cli.pretrain", "eval": "trainer.cli.eval"}  # eval: the embedding pass over ranks


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(torchrun options, module to run, its arguments)."""
    for i, arg in enumerate(argv):
        if arg in COMMANDS:
            return argv[:i], COMMANDS[arg], argv[i + 1:]
    raise ValueError("name the command to launch: audioclr launch [torchrun options] pretrain --config X.yaml ...")


def exit_code(worker_code: int) -> int:
    """A worker's exit status as a shell reports it (killed by signal N: 128 + N)."""
    return 128 - worker_code if worker_code < 0 else worker_code


def check_options(args) -> None:
    """torchrun's own checks end in an assertion or a traceback: these say it in a line."""
    nproc = str(args.nproc_per_node)
    if not (nproc in ("auto", "cpu", "gpu", "xpu") or (nproc.isdigit() and int(nproc) > 0)):
        raise ValueError(f"--nproc-per-node must be a positive number or auto, cpu or gpu, not {nproc!r}")
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, not {args.max_restarts}")
    nodes = str(args.nnodes).split(":")
    if not all(n.isdigit() and int(n) > 0 for n in nodes) or len(nodes) > 2 or int(nodes[0]) > int(nodes[-1]):
        raise ValueError(f"--nnodes must be N or MIN:MAX with 0 < MIN <= MAX, not {args.nnodes!r}")


class RendezvousWatch(logging.Handler):
    """Says, while the agent waits for the other nodes of a many-node launch, what it waits
    for and how long it will wait; silent once the group has met."""

    EVERY = 60.0

    def __init__(self, config) -> None:
        super().__init__()
        self.met = threading.Event()
        rdzv = config.rdzv_configs
        self.timeout = int(rdzv.get("join_timeout", rdzv.get("timeout", 600)))
        nodes = f"{config.min_nodes}" if config.min_nodes == config.max_nodes else \
            f"{config.min_nodes} to {config.max_nodes}"
        self.what = f"waiting for {nodes} nodes to join at {config.rdzv_endpoint or 'the rendezvous'}"

    def emit(self, record: logging.LogRecord) -> None:
        if "Rendezvous complete" in record.getMessage():
            self.met.set()

    def start(self) -> None:
        agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
        agent.setLevel(logging.INFO)
        agent.propagate = False  # only this handler sees the agent's records
        agent.addHandler(self)
        threading.Thread(target=self._say, daemon=True).start()

    def _say(self) -> None:
        start = time.monotonic()
        print(f"audioclr launch: {self.what} (gives up after {self.timeout} s: "
              f"--rdzv-conf join_timeout=SECONDS)", file=sys.stderr, flush=True)
        while not self.met.wait(self.EVERY):
            print(f"audioclr launch: still {self.what} ({time.monotonic() - start:.0f} s of {self.timeout} s)",
                  file=sys.stderr, flush=True)


def stop_with_launcher() -> None:
    """A rank started by a launcher (torchrun, the deepspeed launcher) gets SIGTERM when
    the launcher dies: it saves a checkpoint and exits, as for a scheduler's stop. torchrun
    starts every rank in a session of its own, so a launcher killed with -9 would otherwise
    leave its ranks training on, unseen, beside the rerun that resumes their run."""
    if "LOCAL_RANK" not in os.environ:
        return
    die_with_parent(signal.SIGTERM)
    if os.getppid() == 1:  # it died before the line above took effect
        raise CommandFailed("the launcher of this rank is gone; rerun the launch command to resume")



def main(argv: list[str] | None = None) -> int:
    # deferred: torchrun's elastic launcher is slow to import, and only the launching process needs it
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2

    def options() -> tuple:
        try:
            opts, module, rest = split_argv(argv)
            parser = get_args_parser()
            parser.allow_abbrev = False  # eval's --run is its own, not torchrun's --run-path
            args = parser.parse_args([*opts, "-m", module, *rest])
            check_options(args)
            return config_from_args(args)
        except (ValueError, AssertionError, RuntimeError) as err:
            raise ConfigError(str(err).strip() or type(err).__name__) from None

    def work() -> int:
        config, cmd, cmd_args = options()
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see the module's docstring
        # the agent's own failure report repeats what the ranks printed; ours is one line
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
        if config.max_nodes > 1:
            RendezvousWatch(config).start()
        try:
            elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
        except RendezvousTimeoutError:
            raise CommandFailed("the other nodes did not join within the rendezvous timeout; start the same "
                                "command on every node (NODE_RANK differs), or raise --rdzv-conf join_timeout") \
                from None
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            code = exit_code(failure.exitcode)
            if code in (2, 128 + signal.SIGINT, 128 + signal.SIGTERM):  # the rank said why
                return code
            raise CommandFailed(f"rank {rank} failed first (exit {code}; its message is above)", code) from None
        except SignalException as err:  # the agent itself was signalled: the ranks got it too and saved
            return 128 + int(err.sigval)
        return 0
    return run_guarded("audioclr launch", work, input_errors=(ConfigError,), log_level=logging.WARNING,
                       on_interrupt="stopped by {signal}; the ranks save a checkpoint as they stop")


if __name__ == "__main__":
    sys.exit(main())
