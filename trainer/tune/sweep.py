"""A Ray Tune sweep over the downstream evaluation of saved encoders: :class:`SweepConfig`,
one :class:`~trainer.evaluate.run.Evaluation` per trial, :func:`tune_sweep` (the command:
:mod:`trainer.cli.tune`; Ray's start and stop: :mod:`trainer.tune.ray_cluster`; the tables:
:mod:`trainer.tune.results`)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dataio.atomic import write_text_atomically
from dataio.errors import ConfigError
from dataio.reading.manifest import load_manifest
from dataio.recipes import merge_trees, set_dotted
from dataio.schema import check, option
from trainer.commands import GracefulStop
from trainer.evaluate.clips import ClipSet, load_clipset
from trainer.evaluate.config import PROTOCOLS, EvalConfig
from trainer.evaluate.protocol import MULTI_LABEL_METRICS, SINGLE_LABEL_METRICS, make_rounds, primary_metric
from trainer.evaluate.protocols import protocol as protocol_named
from trainer.evaluate.run import Evaluation, check_rate, frozen_embeddings
from trainer.models.export import read_encoder_meta
from trainer.safe_files import load_tensors
from trainer.train.config import load_config, to_dict
from trainer.tune.ray_cluster import (
    lost_checkpoints,
    node_name,
    quiet_failed_restore,
    remove_ray_temporaries,
    resumable,
    set_aside_damaged_state,
    start_ray,
)
from trainer.tune.results import check_val_against_test, fmt, result_rows, write_tables

log = logging.getLogger("audioclr.tune")
SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class RayConfig:
    address: str = option("", "'' = start Ray on this machine; join a cluster at HOST:6379 (its head), "
                          "'auto' (from a node of it) or ray://HOST:10001")
    num_cpus: int = option(0, "local Ray only: CPUs it may use (0 = all)")
    num_gpus: int = option(-1, "local Ray only: GPUs it may use (-1 = all)")


@dataclass
class SweepConfig:
    name: str = option("sweep", "experiment name: results go to storage/name (rerun = resume)")
    storage: str = option("runs/sweeps", "folder of sweeps (on a cluster: a path every node shares)")
    encoders: list[str] = option([], "run directories of the saved encoders to evaluate (searched as a grid)")
    data: str = option("", "labelled shard folder")
    protocol: str = option("finetune", "evaluation protocol of each trial", PROTOCOLS)
    metric: str = option("", "validation metric to rank and stop on ('' = class_averaged_accuracy, "
                         "or mAP for multi-label shards)")
    mode: str = option("max", "maximise or minimise the metric", ("max", "min"))
    space: dict[str, dict] = option({}, "eval key -> {grid: [..]} | {choice: [..]} | {uniform: [lo, hi]} "
                                    "| {loguniform: [lo, hi]} | {randint: [lo, hi]}")
    num_samples: int = option(1, "random draws of the sampled keys (with grid keys: per grid point)")
    scheduler: str = option("fifo", "fifo: every trial runs all epochs; asha: early stopping", ("fifo", "asha"))
    grace_period: int = option(1, "asha: epochs before a trial may be stopped")
    reduction_factor: float = option(2.0, "asha: keep 1 / reduction_factor of the trials per rung")
    cpus_per_trial: float = option(1.0, "CPUs reserved by each trial")
    gpus_per_trial: float = option(0.0, "GPUs (or fractions of one) reserved by each trial")
    max_failures: int = option(2, "retries of a failed trial, from its last checkpoint")
    ray: RayConfig = option(RayConfig(), "where Ray runs")
    eval: EvalConfig = option(EvalConfig(), "evaluation settings every trial starts from")

    def __post_init__(self) -> None:
        check(bool(self.encoders), "encoders", "list at least one run directory")
        check(bool(self.data), "data", "set the labelled shard folder")
        check(self.num_samples > 0, "num_samples", "must be positive")
        check(self.grace_period > 0 and self.reduction_factor > 1, "grace_period",
              "must be positive (and reduction_factor > 1)")
        check(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        check(self.gpus_per_trial >= 0, "gpus_per_trial", "must be >= 0")
        for key, spec in self.space.items():
            check_space(key, spec, self.eval)


def nest(dotted: dict) -> dict:
    """{"finetune.alpha": 0.5} -> {"finetune": {"alpha": 0.5}}."""
    tree: dict = {}
    for key, value in dotted.items():
        set_dotted(tree, key, value)
    return tree


def trial_eval_config(base: dict, params: dict) -> EvalConfig:
    """The base ``eval`` settings with a trial's dotted ``params`` on top (checked)."""
    return load_config(EvalConfig, None, None, base=merge_trees(base, nest(params)))


def check_space(key: str, spec: dict, base: EvalConfig) -> None:
    """A search dimension must name one sampler and an existing eval key whose type takes
    its values (a typo fails here, naming the key, not in a trial)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise ConfigError(f"space.{key}: give exactly one of {', '.join(SAMPLERS)}, e.g. {{grid: [0.1, 0.5]}}")
    (kind, values), = spec.items()
    if not isinstance(values, list) or not values or (kind not in ("grid", "choice") and len(values) != 2):
        raise ConfigError(f"space.{key}.{kind}: expected " +
                          ("a non-empty list" if kind in ("grid", "choice") else "[low, high]"))
    for value in values:
        try:
            trial_eval_config(to_dict(base), {key: value})
        except ConfigError as err:
            raise ConfigError(f"space.{key}: {err}") from None


def encoder_paths(cfg: SweepConfig) -> list[str]:
    """The encoders as absolute paths: each trial's ``encoder`` parameter, and the key of
    its shared embeddings."""
    return [str(Path(e).resolve()) for e in cfg.encoders]


def param_space(cfg: SweepConfig) -> dict:
    """Ray Tune's search space: the encoders as a grid, then each dimension of ``space``."""
    from ray import tune  # deferred: Ray is optional and slow to import

    samplers = {"grid": tune.grid_search, "choice": tune.choice,
                "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                "randint": lambda v: tune.randint(v[0], v[1] + 1)}
    encoders = encoder_paths(cfg)
    space = {"encoder": tune.grid_search(encoders) if len(encoders) > 1 else encoders[0]}
    for key, spec in cfg.space.items():
        (kind, values), = spec.items()
        space[key] = samplers[kind](values)
    return space


def run_trial(params: dict, *, sweep: dict, shared: dict) -> None:
    """One trial: the evaluation stepped epoch by epoch, each epoch reported to Ray Tune
    with a checkpoint of every round's state (resumed from the last one on retry). The
    clips, and a frozen protocol's embeddings, come from Ray's object store (``shared``)."""
    import ray  # deferred: Ray is optional and slow to import; this runs in a Ray worker
    import torch
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per saved checkpoint

    knobs = {k: v for k, v in params.items() if k != "encoder"}
    cfg = trial_eval_config(sweep["eval"], knobs)
    frozen = shared["frozen"].get(params["encoder"])
    evaluation = Evaluation(sweep["protocol"], params["encoder"], sweep["data"], cfg, clips=ray.get(shared["clips"]),
                            frozen=None if frozen is None else ray.get(frozen))
    where = {"embedded_in_trial": evaluation.embedded_here, "node": node_name(ray)}
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            evaluation.load_state_dict(load_tensors(Path(folder) / "state.pt"))
        start = evaluation.runner.epoch
    while not evaluation.done:
        metrics = {**evaluation.step(), "start_epoch": start, **where}
        with tempfile.TemporaryDirectory() as folder:
            torch.save(evaluation.state_dict(), Path(folder) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def preflight(cfg: SweepConfig) -> tuple[str, ClipSet]:
    """Check the data before any trial starts; return the validation metric's name and
    the clips (loaded once, shared with every trial)."""
    for enc in cfg.encoders:
        if not (Path(enc) / "encoder.json").is_file():
            raise FileNotFoundError(f"encoders: {enc} holds no exported encoder (encoder.json)")
    # the whole path: the trials read the shards again, from their own working folder
    manifest = load_manifest(cfg.data if "://" in cfg.data else Path(cfg.data).resolve())
    for enc in cfg.encoders:
        check_rate(manifest, read_encoder_meta(enc)["frontend"]["sample_rate"], enc)
    clips = load_clipset(manifest)  # no audio: a trial reads the shards (at the same path on every node)
    e = cfg.eval
    rounds = make_rounds(clips, e.split, test_fraction=e.test_fraction, val_fraction=e.val_fraction,
                         seed=e.seed, max_rounds=e.max_rounds)
    if any(len(r.val) == 0 for r in rounds):
        raise ConfigError("eval.val_fraction: a sweep ranks trials on validation clips, never on test clips; "
                          "the shards have no 'val' split, so set eval.val_fraction (e.g. 0.2)")
    metric = cfg.metric or primary_metric(clips)
    valid = MULTI_LABEL_METRICS if clips.multilabel else SINGLE_LABEL_METRICS
    if metric not in valid:
        raise ConfigError(f"metric: '{metric}' is not one of {', '.join(valid)} for these shards")
    return metric, clips


# eval keys that change a frozen encoder's embeddings: a space over one of them embeds per trial
PER_TRIAL_EMBEDDINGS = ("patch_seconds", "hop_seconds", "device")


def share_inputs(cfg: SweepConfig, clips: ClipSet) -> dict:
    """Put what every trial reads into Ray's object store, once: the clips, and for the
    frozen protocols each encoder's embeddings of them, computed by one Ray task per
    encoder with a trial's resources (on whichever node has them) instead of once per
    trial. Each node fetches an object once; a lost copy is computed again by Ray."""
    import ray  # deferred: Ray is optional and slow to import

    t0 = time.perf_counter()
    shared = {"clips": ray.put(clips), "frozen": {}}
    if not protocol_named(cfg.protocol).frozen:
        return shared
    varied = sorted(set(cfg.space) & set(PER_TRIAL_EMBEDDINGS))
    if varied:
        log.info("the space varies %s: each trial embeds the clips itself", ", ".join(varied))
        return shared
    embed = ray.remote(frozen_embeddings).options(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)
    encoders = encoder_paths(cfg)
    shared["frozen"] = {e: embed.remote(e, shared["clips"], cfg.eval) for e in encoders}
    try:
        sizes = [ray.get(ref).patches.nbytes for ref in shared["frozen"].values()]
    except ray.exceptions.RayTaskError as err:
        raise ValueError(f"embedding the clips failed: {err.cause!r}") from None
    log.info("embedded %d clips with %d encoder(s) in %.1f s, once: the trials share them through Ray's object "
             "store (%.1f MB)", len(clips), len(encoders), time.perf_counter() - t0, sum(sizes) / 1e6)
    return shared


def trial_lines(cfg: SweepConfig, metric: str):
    """A Ray Tune callback that logs one line as each trial starts, ends or fails (Ray Tune's
    own report, a status table and a result table per trial, is off: 391 lines for a small sweep)."""
    from ray.tune import Callback  # deferred: Ray is optional and slow to import

    def knobs(trial) -> str:
        return ", ".join(f"{k}={trial.config.get(k)}" for k in cfg.space) or "-"

    class TrialLines(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("trial %s started (%s)", trial.trial_id, knobs(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            log.info("trial %s done after %s epoch(s) (%s): val %s %s, test %s", trial.trial_id, r.get("epoch", "?"),
                     knobs(trial), metric, fmt(r.get(f"val_{metric}", "?")), fmt(r.get(f"test_{metric}", "?")))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed (%s); see %s", trial.trial_id, knobs(trial), trial.local_path or "its folder")

    return TrialLines()


def build_tuner(cfg: SweepConfig, metric: str, exp_dir: Path, shared: dict, restart_errored: bool = False):
    """A fresh Tuner, or the restored one when ``exp_dir`` holds this sweep already
    (errored trials resume from their checkpoint, or with ``restart_errored`` from scratch)."""
    from ray import tune  # deferred: Ray is optional and slow to import
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = {"protocol": cfg.protocol, "data": str(Path(cfg.data).resolve()), "eval": to_dict(cfg.eval)}
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, shared=shared),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    set_aside_damaged_state(exp_dir)
    if tune.Tuner.can_restore(str(exp_dir)) and resumable(exp_dir):
        log.info("resuming the sweep in %s", exp_dir)
        try:  # the space again: where Ray cannot read the state, it starts the sweep over from it
            return tune.Tuner.restore(str(exp_dir), trainable, param_space=param_space(cfg), resume_unfinished=True,
                                      resume_errored=not restart_errored, restart_errored=restart_errored)
        except Exception as err:
            raise ConfigError(f"the sweep state in {exp_dir} cannot be read ({err!r}); give this sweep "
                              f"another name= or delete that folder") from None
    epochs = protocol_named(cfg.protocol).epochs(cfg.eval)
    scheduler = FIFOScheduler() if cfg.scheduler == "fifo" else ASHAScheduler(
        time_attr="training_iteration", max_t=epochs, grace_period=min(cfg.grace_period, epochs),
        reduction_factor=cfg.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=f"val_{metric}", mode=cfg.mode, num_samples=cfg.num_samples,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(exp_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0,
                                  callbacks=[trial_lines(cfg, metric)]))


def write_best(best: dict, cfg: SweepConfig, exp_dir: Path) -> Path:
    """``best.yaml``: the eval settings of the best trial, opening with the command that runs them."""
    knobs = {k: best[k] for k in cfg.space}
    resolved = trial_eval_config(to_dict(cfg.eval), knobs)
    path = exp_dir / "best.yaml"
    header = (f"# audioclr eval --run {best['encoder']} --data {Path(cfg.data).resolve()} "
              f"--protocol {cfg.protocol} --config {path}\n"
              f"# best trial {best['trial']} of sweep '{cfg.name}': "
              + ", ".join(f"{k}={v}" for k, v in knobs.items()) + "\n")
    return write_text_atomically(path, header + yaml.safe_dump({"eval": to_dict(resolved)}, sort_keys=False))


def same_sweep(cfg: SweepConfig, exp_dir: Path) -> None:
    """Save the sweep's settings on the first run; a rerun with other settings under the
    same name would mix two sweeps in one table, so it is refused."""
    saved, now = exp_dir / "sweep.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=True)

    def settings(text: str) -> dict:  # where Ray runs is not a setting of the sweep
        return {k: v for k, v in (yaml.safe_load(text) or {}).items() if k != "ray"}

    if saved.is_file() and settings(saved.read_text()) != settings(now):
        raise ConfigError(f"{exp_dir} holds a sweep with other settings ({saved}); "
                          f"give this one another name= or delete that folder")
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not saved.is_file():
        write_text_atomically(saved, now)


def sweep_stop() -> GracefulStop:
    """Ctrl-C (SIGINT) and SIGTERM stop a sweep alike: Ray Tune is asked to stop through
    SIGUSR1 (it then saves its experiment state once more), the trials keep their
    checkpoints, and the command exits 128 + signal. Before Ray Tune runs, or at a second
    signal, it leaves at once."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards it as SIGUSR1
    return GracefulStop("{signal} received: stopping the sweep after Ray Tune saves its state (again to leave now)",
                        log,
                        forward=lambda: signal.raise_signal(signal.SIGUSR1),
                        ready=lambda: signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None))


def tune_sweep(cfg: SweepConfig, stop: GracefulStop | None = None) -> tuple[list[dict], Path]:
    metric, clips = preflight(cfg)
    exp_dir = (Path(cfg.storage) / cfg.name).resolve()
    same_sweep(cfg, exp_dir)
    start_ray(cfg.ray)
    if stop is not None:
        stop.arm()
    shared = share_inputs(cfg, clips)
    try:
        with quiet_failed_restore(exp_dir):
            results = build_tuner(cfg, metric, exp_dir, shared).fit()
            if lost_checkpoints(results) and not (stop and stop.signal):
                results = build_tuner(cfg, metric, exp_dir, shared, restart_errored=True).fit()
    finally:
        remove_ray_temporaries(exp_dir)
    rows = result_rows(results, cfg, metric)
    check_val_against_test(rows, metric)
    write_tables(rows, exp_dir)
    if rows and rows[0]["status"] == "ok":
        write_best(rows[0], cfg, exp_dir)
    return rows, exp_dir
