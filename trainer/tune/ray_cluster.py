"""The Ray side of a sweep: joining or starting the cluster, naming its nodes, and the
experiment state Ray leaves behind when a sweep is stopped."""

from __future__ import annotations

import contextlib
import json
import logging
import pickletools
import re
import socket
import sys
from pathlib import Path

from dataio.schema import ConfigError
from dataio.stop_signal import stops_held

log = logging.getLogger("audioclr.tune")


def node_name(ray) -> str:
    """The Ray node this runs on by its name (its IP unless ``ray start --node-name``): a
    node id is new at every start, so a sweep resumed on the same machine would show two."""
    node_id = ray.get_runtime_context().get_node_id()
    try:
        return next(n["NodeName"] for n in ray.nodes() if n.get("NodeID") == node_id)
    except (StopIteration, KeyError, RuntimeError):
        return node_id[:8]


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that ``ray.address`` names, or None for 'auto' (Ray finds its cluster)."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address: '{address}' is not HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def start_ray(cfg, wait_s: float = 10.0) -> None:
    """Join the cluster ``cfg.address`` names (``cfg``: the sweep's ``ray`` section), with a
    clear error within about ``wait_s`` when none answers there (Ray itself retries for a long
    while), or start Ray here."""
    import ray  # deferred: Ray is optional and slow to import

    if ray.is_initialized():
        return
    if cfg.address:
        endpoint = ray_endpoint(cfg.address)
        if endpoint is not None:
            try:
                socket.create_connection(endpoint, timeout=wait_s).close()
            except OSError as err:
                raise ConfigError(f"ray.address: no Ray cluster answers at {cfg.address} ({err.strerror or err}); "
                                  f"start one (ray start --head) or leave ray.address empty to run Ray here") from None
        try:
            _init(ray, False, address=cfg.address, include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError) as err:
            raise ConfigError(f"ray.address: cannot join the Ray cluster at {cfg.address}: "
                              f"{str(err).splitlines()[0]}") from None
        log.info("joined the Ray cluster at %s: %d node(s), %s CPUs, %s GPUs", cfg.address, len(ray.nodes()),
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
        return
    # "local": a Ray of its own, also where this machine runs another (``ray start``), which
    # ray.init would join otherwise, and then refuse num_cpus (exit 2, in Ray's words)
    _init(ray, True, address="local", num_cpus=cfg.num_cpus or None,
          num_gpus=None if cfg.num_gpus < 0 else cfg.num_gpus, include_dashboard=False)


def _init(ray, starts_ray: bool, **kwargs) -> None:
    """``ray.init``, with the command's own stop handling kept. Ray's is turned off in this
    process: the SIGTERM handler ``ray.init`` installs (``sys.exit(15)``: an exit status 15
    without a word) and the C++ failure signal handler of the driver's core worker (it took
    SIGTERM as a crash: a stack dump, then SIGABRT a few seconds later, the table never
    printed). Starting Ray here (``starts_ray``), a stop that comes while it starts Ray's
    processes is taken once it returns: an init cut short registers no shutdown, and its
    node's agents outlived the command by a minute."""
    from ray._private import ray_constants, utils  # deferred: Ray is optional and slow to import

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(utils, "set_sigterm_handler", lambda handler: None))
        stack.enter_context(_patched(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", True))
        if starts_ray:
            stack.enter_context(stops_held())
        ray.init(**kwargs)


def stop_ray() -> None:
    """Ray's processes end here, whole (a stop that comes meanwhile is taken after), not at
    interpreter exit: there a Ctrl-C cut Ray's shutdown short, with a traceback, the node's
    agents left running, or a crash (exit -11) in place of the command's exit status."""
    ray = sys.modules.get("ray")  # never imported: never started
    if ray is not None and ray.is_initialized():
        with stops_held():
            ray.shutdown()


@contextlib.contextmanager
def _patched(module, name: str, value):
    """``module.name`` is ``value`` inside (left alone where this Ray has no such name)."""
    if not hasattr(module, name):
        yield
        return
    kept = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, kept)


def set_aside_damaged_state(exp_dir: Path) -> list[Path]:
    """Ray copies its experiment and searcher state from the session folder into the
    storage folder without a rename, so a driver killed mid-copy can leave an empty or
    truncated file there; ``Tuner.restore`` then trusts it (the trials come back with an
    empty config). Such a file is renamed ``*.damaged``: the trials and their checkpoints
    are still listed in the last readable experiment state."""
    damaged = []
    for path in sorted(exp_dir.glob("experiment_state-*.json")) + sorted(exp_dir.glob("basic-variant-state-*.json")):
        try:
            with open(path, "rb") as f:
                # the searcher state is a pickle: its opcodes are walked to the STOP, never run
                json.load(f) if path.name.startswith("experiment_state") else _walk_pickle(f.read())
        except Exception as err:
            log.warning("setting aside %s, damaged when the sweep was stopped (%r)", path.name, err)
            path.rename(path.with_name(path.name + ".damaged"))
            damaged.append(path)
    return damaged


def resumable(exp_dir: Path) -> bool:
    """Whether ``exp_dir`` holds a sweep state Ray Tune can go on from: an experiment state
    (set aside first when damaged) that lists trials, or lists none but comes with the
    searcher's state (which holds the trials still to come). A state saved before the first
    trial, its searcher's state lost, would resume a sweep with nothing left to run."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return False
    try:
        trials = json.loads(states[-1].read_text()).get("trial_data")
    except (OSError, ValueError, AttributeError):
        return True  # Ray reads it, and says so when it cannot (see ``quiet_failed_restore``)
    if trials or any(exp_dir.glob("basic-variant-state-*.json")):
        return True
    log.warning("the sweep state in %s was saved before any trial started: the sweep starts from its first trial",
                exp_dir)
    for path in states:
        path.rename(path.with_name(path.name + ".unused"))
    return False


@contextlib.contextmanager
def quiet_failed_restore(exp_dir: Path):
    """Ray Tune, unable to read a sweep state it was asked to resume, logs a traceback and
    starts the sweep again from the search space. One line of ours says so instead."""
    ray_log = logging.getLogger("ray.tune.execution.tune_controller")

    def one_line(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to restore the run state"):
            cause = record.exc_info[1] if record.exc_info else None
            log.warning("the sweep state in %s cannot be resumed (%r): the sweep starts from its first trial",
                        exp_dir, cause)
            return False
        return not record.getMessage().startswith("Restarting experiment")

    ray_log.addFilter(one_line)
    try:
        yield
    finally:
        ray_log.removeFilter(one_line)


# Ray Tune saves its searcher's state through ".<uuid>-tmp-<name>" and a rename
RAY_TEMPORARY = re.compile(r"\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-tmp-")


def remove_ray_temporaries(exp_dir: Path) -> None:
    """Delete the working files of Ray Tune's state saves that a stop cut short."""
    for path in exp_dir.glob(".*-tmp-*") if exp_dir.is_dir() else ():
        if RAY_TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)


def _walk_pickle(data: bytes) -> None:
    """Raise unless ``data`` is one complete pickle (checked opcode by opcode, nothing executed)."""
    if not data:
        raise ValueError("empty file")
    for _ in pickletools.genops(data):
        pass


def lost_checkpoints(results) -> bool:
    """Whether a restored trial failed because its last checkpoint is gone. Ray deletes a
    trial's older checkpoint as soon as a newer one is registered, and writes the
    experiment state naming the newer one a moment later; a driver killed in between
    leaves a state that names a deleted checkpoint. Such trials are then restarted."""
    lost = [r for r in results if r.error and "does not exist on storage anymore" in str(r.error)]
    for r in lost:
        log.warning("trial %s lost its last checkpoint when the sweep was stopped: it restarts from epoch 0",
                    (r.metrics or {}).get("trial_id", r.path))
    return bool(lost)
