"""``audioclr tune --config configs/sweeps/X.yaml [key=value ...]``: Ray Tune searches over
the downstream evaluation of saved encoders (fine-tuning's alpha, temperature, lr; kNN's
k and temperature; ...).

Each trial is one :class:`~trainer.evaluate.run.Evaluation` (every round / fold in
lockstep); after each epoch it reports the mean over rounds of its validation and test
metrics and checkpoints its state through Ray Tune, so ASHA can stop it early, a failed
trial is retried from its last epoch, and rerunning the same command resumes a stopped
sweep. Trials are ranked on validation clips only (``eval.val_fraction`` or the shards'
``val`` split); the test columns are reported, never selected on.

Writes into ``storage/name/``: ``results.csv`` and ``results.md`` (sorted by the
metric) and ``best.yaml`` (ready for ``audioclr eval --config``).
"""

from __future__ import annotations

import logging
import os
import signal

from trainer.commands import INPUT_ERRORS, config_parser, print_help_config, run_guarded
from trainer.safe_files import CheckpointError
from trainer.train.config import load_config
from trainer.tune.ray_cluster import stop_ray
from trainer.tune.sweep import SweepConfig, sweep_stop, tune_sweep

log = logging.getLogger("audioclr.tune")

def main(argv: list[str] | None = None) -> int:
    p = config_parser("audioclr tune", __doc__, "sweep YAML (configs/sweeps/*.yaml; required)",
                      "name=alpha2 encoders=[runs/a,runs/b] eval.finetune.epochs=5 ...")
    p.add_argument("--address", help="an existing Ray cluster to run on (= ray.address): HOST:6379 of its head, "
                   "'auto' on a node of it, or ray://HOST:10001")
    args = p.parse_args(argv)
    if args.help_config:
        return print_help_config(SweepConfig)
    if args.address is not None:
        args.overrides.append(f"ray.address={args.address}")
    if not args.config:
        p.error("--config is required")
    # Ray Tune warns at every few saves that "snapshotting ... may become a bottleneck": a
    # sweep saves each trial's state every epoch on purpose (resume), and the trials are small
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    def work() -> int:
        cfg = load_config(SweepConfig, args.config, args.overrides)
        try:
            with sweep_stop() as stop:
                rows, exp_dir = tune_sweep(cfg, stop)
        finally:
            stop_ray()
        print((exp_dir / "results.md").read_text())
        if stop.signal:
            log.warning("stopped by %s; the table above holds the trials so far. Rerun the same command to resume "
                        "the sweep (%s)", signal.Signals(stop.signal).name, exp_dir)
            return 128 + stop.signal
        failed = sum(r["status"] != "ok" for r in rows)
        print(f"{len(rows)} trial(s), {failed} failed; results in {exp_dir} (results.csv, results.md, best.yaml)")
        return 1 if failed == len(rows) else 0

    return run_guarded("audioclr tune", work, input_errors=(*INPUT_ERRORS, CheckpointError),
                       on_interrupt="stopped at once; trial checkpoints are kept, rerun the same command to resume")
