"""The signal fuzzer, training and evaluation commands (issue 36, rows 6 and 9):
``pretrain``, ``eval`` (kNN and linear), ``bench data`` and ``tune`` stopped by SIGINT (the
whole group, as Ctrl-C) or SIGTERM (the command) at seeded moments end with 130 or 143 and
one line saying so (no traceback), leave no ``.tmp`` behind nor a process running, keep
what they had written (a pretraining's checkpoints, earlier results), and the rerun the
line advises finishes: a pretraining resumes from its last checkpoint, a sweep from its
trials'. The tools, and how to run many more moments: ``tests/stop_utils.py``; the data
commands: ``tests/dataio/test_stops.py``."""

import csv
import json
import re
import subprocess

import pytest
import yaml

from tests.conftest import PYTHON, cli_env, labelled_run, tiny_overrides
from tests.stop_utils import LONG, check_kept, check_stop, moments, rerun, snapshot, stop_at, tmp_leftovers, tmpdir_env

pytestmark = pytest.mark.e2e

CLI = [PYTHON, "-m", "trainer.cli"]


def _env(tmp_path):
    return tmpdir_env(cli_env(), tmp_path / "tmpdir")


def _no_leftovers(run, tmp_path, *folders):
    left = tmp_leftovers(*folders, tmpdir=tmp_path / "tmpdir")
    assert not left, f"{run.where}: left {left}\n{run.stderr[-1500:]}"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A labelled run (its encoder, its shards) with one kNN result already written."""
    root = labelled_run(tmp_path_factory.mktemp("evaluated"), width=4)
    done = subprocess.run([*CLI, "eval", "--run", str(root), "--data", str(root / "shards"), "--protocol", "knn"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


# ------------------------------------------------------------------------- pretrain

STEPS, EVERY = 150, 40


@pytest.mark.parametrize("moment", moments("pretrain", 1.0, 8.0, 1, 12), ids=str)
def test_a_stopped_pretraining_keeps_its_checkpoints_and_resumes(tiny_shards, tmp_path, moment):
    from trainer.train.checkpoint import verify

    run_dir, env = tmp_path / "run", _env(tmp_path)
    cmd = [*CLI, "pretrain", *tiny_overrides(tiny_shards, run_dir), f"train.max_steps={STEPS}",
           f"train.ckpt_every={EVERY}"]
    where = f"pretrain stopped by {moment.sig.name} {moment.after:.1f} s in"
    run = stop_at(cmd, moment, env, where)
    finished = (run_dir / "encoder.json").is_file()
    check_stop(run, moment, finished)
    _no_leftovers(run, tmp_path, run_dir)
    folders = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    damaged = {f.name: verify(f) for f in folders if verify(f) is not None}
    assert not damaged and all(re.fullmatch(r"step_\d{8}", f.name) for f in folders), f"{where}: {damaged or folders}"
    again = rerun(cmd, env)
    assert again.returncode == 0, f"{where}: the rerun failed\n{again.stderr[-3000:]}"
    if folders and not finished:
        assert f"resumed from {folders[-1]} at step {int(folders[-1].name[5:])}" in again.stderr, \
            f"{where}: not resumed from its last checkpoint\n{again.stderr[-3000:]}"
    assert verify(run_dir / "checkpoints" / f"step_{STEPS:08d}") is None and (run_dir / "encoder.json").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), f"{where}: the metrics do not read as one run: {steps}"


# ----------------------------------------------------------------------------- eval

# a linear probe (trained: learning curves), a kNN, and a kNN on other patches: the kept
# embeddings are stale for it, so they are computed again and replaced
VARIANTS = [("linear", []), ("knn", []), ("knn", ["eval.hop_seconds=0.2"])]
EVALS = [(*VARIANTS[i % 3], m) for i, m in enumerate(moments("eval", 1.0, 10.0, 1, 12))]


@pytest.mark.parametrize("protocol,overrides,moment", EVALS, ids=[f"{p}{len(o)}-{m}" for p, o, m in EVALS])
def test_a_stopped_evaluation_writes_no_half_result_and_runs_again(evaluated, tmp_path, protocol, overrides, moment):
    import numpy as np

    eval_dir, env = evaluated / "eval" / "shards", _env(tmp_path)
    before = snapshot(eval_dir)
    cmd = [*CLI, "eval", "--run", str(evaluated), "--data", str(evaluated / "shards"), "--protocol", protocol,
           *overrides]
    where = f"eval {protocol} stopped by {moment.sig.name} {moment.after:.1f} s in"
    run = stop_at(cmd, moment, env, where)
    new = sorted(set(snapshot(eval_dir)) - set(before))
    check_stop(run, moment, finished=any(name.endswith(".json") for name in new))
    _no_leftovers(run, tmp_path, evaluated)
    check_kept(before, eval_dir, where, may_change=("summary.md", "embeddings.npz"))  # each rewritten whole
    for path in eval_dir.glob("*.json"):
        json.loads(path.read_text())  # each result whole
    with np.load(eval_dir / "embeddings.npz") as kept:
        assert kept["patches"].shape[0] == kept["owner"].shape[0], where
    for path in eval_dir.glob("*.png"):
        assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), f"{where}: {path.name} cut short"
    orphans = [n for n in new if n.endswith(".png") and not any(n.startswith(j[:-5] + "_") for j in new
                                                                 if j.endswith(".json"))]
    assert not orphans, f"{where}: pictures without their result: {orphans}\n{run.stderr[-1500:]}"
    again = rerun(cmd, env)
    assert again.returncode == 0, f"{where}: the rerun failed\n{again.stderr[-3000:]}"
    written = again.stdout.strip().splitlines()[-1].removeprefix("results in ")
    assert json.loads(open(written).read())["protocol"] == protocol


# ----------------------------------------------------------------------- bench data

@pytest.mark.parametrize("moment", moments("bench-data", 1.0, 8.0, 1, 12), ids=str)
def test_a_stopped_data_benchmark_keeps_its_earlier_result_and_runs_again(tmp_path, moment):
    out, env = tmp_path / "bench.json", _env(tmp_path)
    out.write_text('{"earlier": "result"}')
    cmd = [*CLI, "bench", "data", "--clips", "16", "--clip-seconds", "1", "--backends", "torch", "--seconds", "0.5",
           "--batch-size", "4", "--cores", "1", "--out", str(out)]
    where = f"bench data stopped by {moment.sig.name} {moment.after:.1f} s in"
    run = stop_at(cmd, moment, env, where)
    result = json.loads(out.read_text())  # the earlier one, or the new one whole
    check_stop(run, moment, finished="earlier" not in result)
    _no_leftovers(run, tmp_path, tmp_path)
    again = rerun(cmd, env)
    assert again.returncode == 0, f"{where}: the rerun failed\n{again.stderr[-3000:]}"
    assert "torch" in json.loads(out.read_text())["clips_per_second"]


# ----------------------------------------------------------------------------- tune

SWEEP_EPOCHS = 20
GRID = [0.25, 0.5, 0.75]  # trials, one at a time: about 30 s


@pytest.mark.skipif(not LONG, reason="a sweep's random stops run under AUDIOCLR_FUZZ=long (Ray's start twice: the "
                    "costliest moment); the default run stops a sweep in tests/trainer/test_tune.py")
@pytest.mark.parametrize("moment", moments("tune", 2.0, 45.0, 1, 8), ids=str)
def test_a_stopped_sweep_keeps_its_state_and_resumes(evaluated, tmp_path, moment):
    """Row 9: a sweep stopped 45 s in (its trials running, one at a time) exited with
    another status than 130 once in two runs under load: a stop as it ended came during
    Ray's shutdown at interpreter exit (exit -2 or -11, agents left running); one while Ray
    started exited 15 or aborted."""
    storage = tmp_path / "sweeps"
    sweep = {"name": "stop", "storage": str(storage), "encoders": [str(evaluated)], "data": str(evaluated / "shards"),
             "protocol": "finetune", "space": {"finetune.alpha": {"grid": GRID}}, "ray": {"num_cpus": 1},
             "eval": {"val_fraction": 0.25, "finetune": {"epochs": SWEEP_EPOCHS, "batch_size": 4}}}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(sweep))
    cmd, env = [*CLI, "tune", "--config", str(config)], cli_env()  # Ray's socket paths: TMPDIR stays short
    where = f"tune stopped by {moment.sig.name} {moment.after:.1f} s in"
    run = stop_at(cmd, moment, env, where)
    exp_dir = storage / "stop"
    check_stop(run, moment, finished=(exp_dir / "best.yaml").is_file())
    left = tmp_leftovers(storage)
    assert not left, f"{where}: left {left}\n{run.stderr[-1500:]}"
    if (exp_dir / "results.csv").is_file():  # the table so far, whole
        assert all(r["status"] for r in csv.DictReader(open(exp_dir / "results.csv"))), where
    settings = (exp_dir / "sweep.yaml").read_bytes() if (exp_dir / "sweep.yaml").is_file() else None
    again = rerun(cmd, env)
    assert again.returncode == 0, f"{where}: the rerun failed\n{again.stderr[-3000:]}"
    rows = list(csv.DictReader(open(exp_dir / "results.csv")))
    assert len(rows) == len(GRID) and all(r["status"] == "ok" and r["epochs"] == str(SWEEP_EPOCHS) for r in rows), \
        f"{where}: {rows}\n{again.stderr[-3000:]}"
    assert settings is None or (exp_dir / "sweep.yaml").read_bytes() == settings, where
