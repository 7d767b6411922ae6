"""Fuzzers, so the next bad input is found here and not by a user.

1. Every config key of every command, walked from the schemas (new keys are covered without
   editing this file), given wrong types, out-of-range, non-finite, empty, huge and unicode
   values, plus malformed overrides: the value is accepted, or refused by a ConfigError that
   names the key; through each command's own entry point a refusal is exit 2 and one line,
   no traceback, nothing written under ``run_dir``.
2. Every file kind the project reads (shards, manifests, checkpoint files, ``meta.json``,
   exported encoders, sweep states) truncated, byte-flipped and deleted: a named error or a
   named, counted skip, never a traceback, a hang or a silent wrong answer.

Seeded and bounded in the default run; ``AUDIOCLR_FUZZ=long`` runs every case (and
``AUDIOCLR_FUZZ_SEED=N`` another draw)::

    AUDIOCLR_FUZZ=long AUDIOCLR_FUZZ_SEED=7 python3 -m pytest -q tests/trainer/test_fuzz.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, export_random_encoder
from tests.shard_utils import make_shards

LONG = os.environ.get("AUDIOCLR_FUZZ") == "long"
SEED = int(os.environ.get("AUDIOCLR_FUZZ_SEED", "0"))

# ---------------------------------------------------------------------------- the keys


def schema_keys(cls, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted key, type hint) of every leaf of a config dataclass."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += schema_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append((prefix + f.name, hint))
    return keys


def augment_keys() -> list[tuple[str, typing.Any]]:
    """``augment.<op>.<setting>`` of every augmentation op."""
    from dataio.augment import OPS
    keys = []
    for name, op in OPS.items():
        keys += [(f"augment.{name}.{k}", hint) for k, hint in schema_keys(op) if k not in ("op", "label")]
    return keys


# what each command needs beside the fuzzed key to be a valid config
BASE = {"pretrain": ["data.backend=synthetic"], "eval": [],
        "tune": ["data=/d", "encoders=[/e]", "space={finetune.alpha: {grid: [0.5]}}", "eval.val_fraction=0.2"]}


def commands() -> dict:
    from trainer.evaluate.config import EvalRoot
    from trainer.train.config import PretrainConfig
    from trainer.tune.sweep import SweepConfig
    return {"pretrain": (PretrainConfig, schema_keys(PretrainConfig) + augment_keys()),
            "eval": (EvalRoot, schema_keys(EvalRoot)),
            "tune": (SweepConfig, schema_keys(SweepConfig))}


BAD_ANY = ["[1, 2]", "{a: 1}", "''", "'ñ☃\u202etxt'", "null", "'" + "x" * 5000 + "'"]
BAD_NUMBER = ["-1", "0", "-0.000001", "1e30", "1000000000000000000000000000000", ".nan", ".inf", "-.inf", "true",
              "'12abc'"]
BAD_TEXT = ["12345", "'../../../etc'", "'\\x00'"]
BAD_BOOL = ["'maybe'", "2", "-1"]
MALFORMED = ["{key}", "={v}", "{key}=[1,", "{key}={{", "{key}.x.y=1", ".{key}=1", "{key}..x=1", "{key}=a=b",
             "{key} = 1"]


def values_for(hint) -> list[str]:
    base = typing.get_origin(hint) or hint
    if base in (int, float):
        return BAD_NUMBER + BAD_ANY
    if base is bool:
        return BAD_BOOL + BAD_ANY
    if base is str:
        return BAD_TEXT + BAD_ANY
    return BAD_ANY + BAD_NUMBER[:3]


def config_cases() -> list[tuple[str, str, str]]:
    """(command, key, override) for every key and every value (and malformed forms)."""
    cases = []
    for command, (_, keys) in commands().items():
        for key, hint in keys:
            cases += [(command, key, f"{key}={v}") for v in values_for(hint)]
            cases += [(command, key, m.format(key=key, v=1)) for m in MALFORMED[:3]]
    return cases


def _names_key(message: str, key: str) -> bool:
    """The message names the key (a cross-key check may name the other key of the pair,
    so the last part of the dotted name suffices), or the override itself."""
    return key in message or key.split(".")[-1] in message or "override" in message


# -------------------------------------------------------------------- 1. config fuzzer

def test_every_key_of_every_command_is_accepted_or_refused_by_name():
    """All cases, in-process through the schema (about 6,000 in a few seconds)."""
    from dataio.errors import ConfigError
    from trainer.train.config import load_config
    schemas = commands()
    tried, failures = 0, []
    for command, key, override in config_cases():
        tried += 1
        try:
            cfg = load_config(schemas[command][0], None, [*BASE[command], override])
        except ConfigError as err:
            if not _names_key(str(err), key) or "\n" in str(err).strip():
                failures.append(f"{command} {override[:80]!r}: message does not name the key: {str(err)[:200]}")
            continue
        except Exception as err:  # noqa: BLE001 -- what the fuzzer looks for
            failures.append(f"{command} {override[:80]!r}: {type(err).__name__}: {str(err)[:200]}")
            continue
        problem = _accepted_nonsense(cfg, key, override)
        if problem:
            failures.append(f"{command} {override[:80]!r}: accepted, {problem}")
    assert tried > 3000
    assert not failures, f"{len(failures)} of {tried} cases:\n" + "\n".join(failures[:60])


def _accepted_nonsense(cfg, key: str, override: str) -> str:
    """What an accepted value must not be: a non-finite number anywhere, or another type
    than its key's."""
    import math
    node = cfg
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        else:
            node = getattr(node, part, None)
    for value in (node if isinstance(node, (list, tuple)) else [node]):
        if isinstance(value, float) and not math.isfinite(value):
            return f"holds {value}"
    return ""


def _tune_yaml(folder: Path) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "fuzz", "storage": str(folder / "sweeps"), "data": str(folder),
                                    "encoders": [str(folder)], "space": {"finetune.alpha": {"grid": [0.5]}},
                                    "eval": {"val_fraction": 0.2}}))
    return path


def _entry_point(command: str, override: str, folder: Path) -> list[str]:
    if command == "pretrain":
        return ["pretrain", f"run_dir={folder / 'run'}", "data.backend=synthetic", override]
    if command == "eval":
        return ["eval", "--run", str(folder / "run"), "--data", str(folder), override]
    return ["tune", "--config", str(_tune_yaml(folder)), override]


def test_a_refused_value_is_exit_2_and_one_line_through_each_command(tmp_path, capsys):
    """Each command's real entry point, on a seeded sample of the refused cases (all of
    them with AUDIOCLR_FUZZ=long)."""
    from dataio.errors import ConfigError
    from trainer.cli import main
    from trainer.train.config import load_config
    schemas = commands()
    refused = []
    for command, key, override in config_cases():
        try:
            load_config(schemas[command][0], None, [*BASE[command], override])
        except ConfigError:
            refused.append((command, key, override))
        except Exception:  # noqa: BLE001 -- the first test names these
            pass
    rng = random.Random(SEED)
    sample = refused if LONG else [c for command in schemas
                                   for c in rng.sample([r for r in refused if r[0] == command], 25)]
    failures = []
    for i, (command, key, override) in enumerate(sample):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        before = sorted(p.name for p in folder.iterdir())
        try:
            code = main(_entry_point(command, override, folder))
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        wrote = sorted(p.name for p in folder.iterdir() if p.name != "sweep.yaml")
        if code != 2 or len(lines) != 1 or "Traceback" in err or not _names_key(err, key) or wrote != [
                n for n in before if n != "sweep.yaml"]:
            failures.append(f"{command} {override[:80]!r}: exit {code}, wrote {wrote}, said {err[-300:]!r}")
    assert not failures, f"{len(failures)} of {len(sample)}:\n" + "\n".join(failures[:40])


@pytest.mark.e2e
def test_an_accepted_value_trains_or_is_refused_by_name():
    """The accepted-values runner (issue 36): a seeded sample of the pretraining values the
    schema accepts (all of them with AUDIOCLR_FUZZ=long) each runs a 2-step tiny pretraining
    (tests/trainer/accepted_runner.py, one process): it trains (0), or stops with one line
    (2 a refusal, 1 a run that cannot go on such as a non-finite loss), never a traceback
    or a hang."""
    import json
    import subprocess
    import sys

    from trainer.train.config import load_config
    schemas = commands()
    accepted = []
    for command, _key, override in config_cases():
        if command != "pretrain":
            continue
        try:
            load_config(schemas[command][0], None, [*BASE[command], override])
        except Exception:  # noqa: BLE001 -- the refused ones are the tests above
            continue
        accepted.append(override)
    sample = accepted if LONG else random.Random(SEED).sample(accepted, 10)
    out = subprocess.run([sys.executable, str(REPO / "tests" / "trainer" / "accepted_runner.py")],
                         input="\n".join(sample) + "\n", capture_output=True, text=True, timeout=300 * len(sample),
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(sample), f"a case hung or killed the runner:\n{out.stderr[-3000:]}"
    failures = []
    for r in results:
        said = [line for line in r["err"].splitlines() if line.startswith("audioclr")]
        if r["code"] not in (0, 1, 2) or "Traceback" in r["err"] or (r["code"] != 0 and len(said) != 1):
            failures.append(f"{r['override'][:80]!r}: exit {r['code']}: {r['err'][-300:]!r}")
    assert not failures, f"{len(failures)} of {len(sample)}:\n" + "\n".join(failures)


BASE_FILES = {"list.yaml": "[1, 2]\n", "broken.yaml": "a: [\n", "loop.yaml": "base: recipe.yaml\n",
              "unknown.yaml": "nokey: 1\n"}


def test_a_bad_base_recipe_is_exit_2_and_one_line_through_each_command(tmp_path, capsys):
    """``base:`` (a key of the YAML file, not of a schema) given every bad value, a missing
    file, a folder, itself, a circle and files that do not hold a recipe, in each command's
    --config: exit 2 and one line naming the key or a file, nothing written."""
    from trainer.cli import main
    values = [*BAD_ANY, *BAD_TEXT, *BAD_NUMBER[:3], "gone.yaml", ".", "recipe.yaml", *BASE_FILES]
    failures = []
    for command in ("pretrain", "eval", "tune"):
        for i, value in enumerate(values):
            folder = tmp_path / command / f"case{i}"
            folder.mkdir(parents=True)
            for name, text in {**BASE_FILES, "recipe.yaml": f"base: {value}\n"}.items():
                (folder / name).write_text(text)
            before = sorted(p.name for p in folder.iterdir())
            argv = {"pretrain": ["pretrain", f"run_dir={folder / 'run'}"], "tune": ["tune"],
                    "eval": ["eval", "--run", str(folder / "run"), "--data", str(folder)]}[command]
            try:
                code = main([*argv, "--config", str(folder / "recipe.yaml")])
            except SystemExit as exit_:
                code = exit_.code
            err = capsys.readouterr().err
            named = any(n in err for n in ("base", "nokey", *BASE_FILES, "recipe.yaml"))
            if code != 2 or len(err.strip().splitlines()) != 1 or "Traceback" in err or not named or sorted(
                    p.name for p in folder.iterdir()) != before:
                failures.append(f"{command} base: {value[:80]!r}: exit {code}, said {err[-300:]!r}")
    assert not failures, f"{len(failures)}:\n" + "\n".join(failures[:40])


# --------------------------------------------------------------------- 2. file fuzzer

def mutations(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes | None]]:
    """``count`` damaged versions of ``data``: cut at a random point, emptied, bytes
    flipped, and the file deleted (None)."""
    out: list[tuple[str, bytes | None]] = [("deleted", None), ("emptied", b"")]
    for _ in range(count):
        kind = rng.choice(["cut", "flip", "flip"])
        if kind == "cut" and len(data) > 1:
            at = rng.randrange(1, len(data))
            out.append((f"cut at {at}", data[:at]))
        else:
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            out.append(("flipped", bytes(damaged)))
    return out


def _apply(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz_corpus")
    make_shards(folder, [4, 4], seconds=0.4)
    return folder


def _read_everything(folder: Path) -> tuple[int, int]:
    """(distinct clips read, clips skipped) of one epoch through the torch back end."""
    import torch

    from dataio.augment import build_augmenter
    from dataio.backends.batch import DataConfig, Placement, steps_per_epoch
    from dataio.backends.registry import open_source
    from dataio.frontend import FrontendConfig
    from dataio.reading.manifest import load_manifest
    manifest = load_manifest(folder)
    cfg = DataConfig(shards=str(folder), batch_size=2, num_workers=0, view_seconds=0.2, shuffle_buffer=1,
                     short_clips="pad")
    place = Placement(steps=steps_per_epoch(cfg, manifest, 1), device=torch.device("cpu"))
    frontend = FrontendConfig(n_mels=16)
    augmenter = build_augmenter({}, frontend, cfg.view_seconds, num_views=2, pairs_per_clip=1, seed=0)
    source = open_source(cfg, manifest, frontend, augmenter, place)
    keys, skipped = set(), 0
    try:
        for batch in source.epoch(0, 0):
            keys.update(batch.keys)
            skipped += batch.skipped
    finally:
        getattr(source, "close", lambda: None)()
    return len(keys), skipped


def test_damaged_shards_and_manifests_are_named_or_skipped_and_counted(corpus, tmp_path, caplog):
    from dataio.errors import DataError, ManifestError
    rng = random.Random(SEED)
    count = 12 if LONG else 3
    failures, tried = [], 0
    for name in ("manifest.json", "shard-00000.tar"):
        for what, content in mutations((corpus / name).read_bytes(), rng, count):
            tried += 1
            copy = tmp_path / f"c{tried}"
            shutil.copytree(corpus, copy)
            _apply(copy / name, content)
            try:
                read, skipped = _read_everything(copy)
            except (ManifestError, DataError) as err:
                if name not in str(err) and str(copy) not in str(err):
                    failures.append(f"{name} {what}: the message does not name the file: {err}")
                continue
            except Exception as err:  # noqa: BLE001 -- what the fuzzer looks for
                failures.append(f"{name} {what}: {type(err).__name__}: {str(err)[:200]}")
                continue
            if content == (corpus / name).read_bytes() or name == "manifest.json":
                continue
            named = "skipping unreadable shard data" in caplog.text and str(copy / name) in caplog.text
            caplog.clear()
            if read < 8 and not (skipped or named):  # clips lost without a word
                failures.append(f"{name} {what}: read {read} clips, nothing counted as skipped or named")
    assert not failures, f"{len(failures)} of {tried}:\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """A run folder with two checkpoints (steps 1 and 2), written by the real loop."""
    from trainer.train.config import PretrainConfig, load_config
    from trainer.train.loop import Pretrainer
    root = tmp_path_factory.mktemp("fuzz_run")
    make_shards(root / "shards", [4, 4], seconds=0.6)
    from tests.conftest import tiny_overrides
    cfg = load_config(PretrainConfig, None, [*tiny_overrides(root / "shards", root / "run"), "data.num_workers=0",
                                             "train.max_steps=2", "train.ckpt_every=1", "train.keep_last=2"])
    trainer = Pretrainer(cfg)
    try:
        assert trainer.train() == "finished"
    finally:
        trainer.close()
    return root / "run"


def test_damaged_checkpoint_files_fall_back_to_the_one_before_by_name(checkpointed, tmp_path):
    from trainer.parallel import distributed
    from trainer.safe_files import CheckpointError
    from trainer.train.checkpoint import Checkpointer
    rng = random.Random(SEED + 1)
    newest = checkpointed / "checkpoints" / "step_00000002"
    kinds = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert {"meta.json", "state.pt", "engine/weights.safetensors"} <= set(kinds), kinds
    failures, tried = [], 0
    for kind in kinds:
        for what, content in mutations((newest / kind).read_bytes(), rng, 4 if LONG else 1):
            tried += 1
            run = tmp_path / f"r{tried}"
            shutil.copytree(checkpointed, run)
            _apply(run / "checkpoints" / "step_00000002" / kind, content)
            pointer = Checkpointer(run, 2, distributed.env_info())
            try:
                chosen = pointer.resume_point()
                shared, _, _ = pointer.load(chosen)
            except CheckpointError as err:
                if "step_0000000" not in str(err):
                    failures.append(f"{kind} {what}: the message does not name the checkpoint: {err}")
                continue
            except Exception as err:  # noqa: BLE001 -- what the fuzzer looks for
                failures.append(f"{kind} {what}: {type(err).__name__}: {str(err)[:200]}")
                continue
            if chosen.name != "step_00000001" or shared["step"] != 1:
                failures.append(f"{kind} {what}: resumed from {chosen.name}, not the undamaged step_00000001")
            elif not (run / "checkpoints" / "step_00000002.damaged").is_dir():
                failures.append(f"{kind} {what}: the damaged checkpoint was not set aside by name")
    assert not failures, f"{len(failures)} of {tried}:\n" + "\n".join(failures)


def test_damaged_exported_encoders_are_refused_by_name(tmp_path):
    from trainer.models.export import load_encoder
    from trainer.safe_files import CheckpointError
    source = tmp_path / "source"
    source.mkdir()
    export_random_encoder(source, width=4)
    rng = random.Random(SEED + 2)
    failures, tried = [], 0
    for name in ("encoder.json", "encoder.safetensors"):
        for what, content in mutations((source / name).read_bytes(), rng, 10 if LONG else 3):
            tried += 1
            run = tmp_path / f"e{tried}"
            shutil.copytree(source, run)
            _apply(run / name, content)
            try:
                load_encoder(run)
            except (CheckpointError, FileNotFoundError) as err:
                if name not in str(err) and "holds no exported encoder" not in str(err):
                    failures.append(f"{name} {what}: the message does not name the file: {err}")
                continue
            except Exception as err:  # noqa: BLE001 -- what the fuzzer looks for
                failures.append(f"{name} {what}: {type(err).__name__}: {str(err)[:200]}")
                continue
            if what != "flipped":
                failures.append(f"{name} {what}: loaded without a word")
    assert not failures, f"{len(failures)} of {tried}:\n" + "\n".join(failures)


def test_damaged_sweep_states_are_set_aside_by_name(tmp_path, caplog):
    import pickle

    from trainer.tune.ray_cluster import set_aside_damaged_state
    state = json.dumps({"trial_data": [["{}", "{}"]], "runner_data": {}, "stats": {}}).encode()
    searcher = pickle.dumps({"a": list(range(100))})
    rng = random.Random(SEED + 3)
    failures, tried = [], 0
    for name, data in (("experiment_state-2026-12-03_18-00-00.json", state),
                       ("basic-variant-state-2026-12-03_18-00-00.json", searcher)):
        for what, content in mutations(data, rng, 10 if LONG else 3):
            if content is None:
                continue  # a missing state is a sweep not started yet
            tried += 1
            folder = tmp_path / f"s{tried}"
            folder.mkdir()
            (folder / name).write_bytes(content)
            try:
                damaged = set_aside_damaged_state(folder)
            except Exception as err:  # noqa: BLE001 -- what the fuzzer looks for
                failures.append(f"{name} {what}: {type(err).__name__}: {err}")
                continue
            readable = _readable(name, content)
            if readable == bool(damaged):
                failures.append(f"{name} {what}: readable={readable}, set aside={bool(damaged)}")
            elif damaged and name not in caplog.text:
                failures.append(f"{name} {what}: set aside without naming it")
    assert not failures, f"{len(failures)} of {tried}:\n" + "\n".join(failures)


def _readable(name: str, content: bytes) -> bool:
    """What the sweep's own check reads (JSON state, or one whole pickle, walked not run)."""
    from trainer.tune.ray_cluster import _walk_pickle
    try:
        json.loads(content) if name.startswith("experiment_state") else _walk_pickle(content)
    except Exception:  # noqa: BLE001
        return False
    return True


def test_the_fuzzer_itself_covers_every_command_and_a_new_key(monkeypatch):
    """A key added to a schema is fuzzed without editing this file."""
    from trainer.train.config import TrainConfig
    keys = {k for k, _ in commands()["pretrain"][1]}
    assert {"data.batch_size", "optim.lr", "train.threads", "augment.rrc.p"} <= keys
    assert any(k.startswith("eval.") for k, _ in commands()["eval"][1])
    assert {"ray.address", "num_samples"} <= {k for k, _ in commands()["tune"][1]}
    assert "train.threads" in {k for k, _ in schema_keys(TrainConfig, "train.")}
    assert REPO.is_dir()


# ------------------------------------------------- 3. the options of the other commands

def command_parsers() -> dict:
    """Every argparse parser the ``audioclr`` commands build, caught as they parse."""
    import argparse

    from trainer.cli import main

    class Caught(Exception):
        pass
    parsers = {}
    original = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        parsers[self.prog] = self
        raise Caught
    argparse.ArgumentParser.parse_args = catch
    try:
        for argv in (["demo-corpus"], ["shard", "x"], ["shard", "convert"], ["check-shards"], ["bench", "data"],
                     ["bench", "train"], ["bench", "quality"], ["bench", "memory"], ["bench", "gradcache"],
                     ["bench", "scale"], ["demo"], ["eval"], ["tune"], ["pretrain"]):
            try:
                main(argv)
            except Caught:
                pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return parsers


def test_every_numeric_option_is_checked_and_refuses_nonsense_by_name():
    import argparse
    parsers = command_parsers()
    assert {"audioclr shard", "audioclr bench data", "audioclr bench train", "audioclr bench memory",
            "audioclr bench gradcache", "audioclr bench scale", "audioclr demo"} <= set(parsers)
    unchecked, failures, tried = [], [], 0
    for prog, parser in parsers.items():
        for action in parser._actions:
            if not action.option_strings:
                continue
            if action.type in (int, float):
                unchecked.append(f"{prog} {action.option_strings[0]}")
                continue
            kind = getattr(action.type, "kind", None)
            if kind is None:
                continue
            low = action.type.minimum
            for value in ["abc", "", "nan", "inf", "-inf", str(low - 1), *([str(low)] if action.type.above else [])]:
                tried += 1
                try:
                    action.type(value)
                except argparse.ArgumentTypeError:
                    continue
                failures.append(f"{prog} {action.option_strings[0]} {value!r}: accepted")
    assert not unchecked, f"numeric options without a range: {unchecked}"
    assert tried > 50 and not failures, failures


def test_a_refused_option_is_exit_2_and_one_line(tmp_path, capsys):
    from trainer.cli import main
    for argv in (["demo", "--clips", "-3", "--out", str(tmp_path / "d")], ["bench", "data", "--seconds", "0"],
                 ["shard", str(tmp_path), "--out", str(tmp_path / "s"), "--sample-rate", "0"],
                 ["bench", "quality", "--csv", "x.csv", "--config", "y.yaml", "--seeds", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err and argv[-2] in err, (argv, err)
    assert not list(tmp_path.iterdir()), "nothing written"
