"""What decides whether a run folder's checkpoint may continue under a config, and what
is said when it may not (or may, with differences)."""

from __future__ import annotations

import logging
from pathlib import Path

from dataio.errors import ConfigError
from trainer.safe_files import describe_error

log = logging.getLogger("audioclr.pretrain")

# What makes the model: a checkpoint whose config differs in one of these cannot continue.
MODEL_KEYS = ("model.", "objective.name", "objective.supcon_dim", "objective.queue_size", "frontend.n_mels",
              "frontend.channels")
NOT_MODEL_KEYS = {"model.pretrained", "model.global_bn"}
START_ELSEWHERE = ("To train this config, give it a new run_dir; to start over in this folder, "
                   "train.resume=none (its checkpoints are then replaced as the new run saves)")


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_same_model(old_config: dict, new_config: dict, folder: Path) -> None:
    """A checkpoint of another model (objective, encoder, sizes, input) cannot continue:
    one message, before anything is loaded or written."""
    old, new = flatten(old_config), flatten(new_config)
    differ = [f"{k}: {old[k]!r} there, {new.get(k)!r} here" for k in sorted(old)
              if k.startswith(MODEL_KEYS) and k not in NOT_MODEL_KEYS and old[k] != new.get(k)]
    if differ:
        raise ConfigError(f"train.resume: {folder} holds another model ({'; '.join(differ)}). {START_ELSEWHERE}")


def report_differences(shared: dict, new_config: dict, steps_per_epoch: int) -> None:
    """Warn about each key that changed since the checkpoint, and a data position that moved."""
    old, new = flatten(shared.get("config", {})), flatten(new_config)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and key != "train.resume":
            log.warning("resume: %s was %r, now %r", key, old.get(key), new.get(key))
    if shared.get("steps_per_epoch") != steps_per_epoch:
        log.warning("resume: %s steps per epoch, was %s: the data position is approximate",
                    steps_per_epoch, shared.get("steps_per_epoch"))


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir``, or say in a ConfigError why it cannot be used."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file, not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run_dir: cannot write into {run_dir}: {describe_error(err)}") from None
