"""``audioclr tune``: the sweep config, a 2x2 grid run through Ray Tune, and a sweep killed
mid-way that resumes from its trials' checkpoints."""

import csv
import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from dataio.errors import ConfigError
from tests.conftest import PYTHON, cli_env
from tests.stop_utils import own_lines
from trainer.evaluate.config import EvalRoot
from trainer.train.config import load_config
from trainer.tune.sweep import SweepConfig, nest, trial_eval_config


def _sweep_yaml(path, run, storage, name, epochs, space):
    cfg = {"name": name, "storage": str(storage), "encoders": [str(run)], "data": str(run / "shards"),
           "protocol": "finetune", "space": space, "ray": {"num_cpus": 2},
           "eval": {"val_fraction": 0.25, "finetune": {"epochs": epochs, "batch_size": 4, "loss": "hybrid"}}}
    path.write_text("# audioclr tune --config this.yaml\n" + yaml.safe_dump(cfg))
    return path


def _tune(config, *extra, **kw):
    return subprocess.run([PYTHON, "-m", "trainer.cli", "tune", "--config", str(config), *extra],
                          capture_output=True, text=True, env=cli_env(), **kw)


@pytest.mark.e2e
def test_space_keys_are_checked_before_ray_starts(encoder_run, tmp_path):
    assert nest({"finetune.alpha": 0.5, "seed": 1}) == {"finetune": {"alpha": 0.5}, "seed": 1}
    assert trial_eval_config({}, {"finetune.alpha": 0.25}).finetune.alpha == 0.25
    base = {"encoders": ["r"], "data": "d"}
    with pytest.raises(ConfigError, match="finetune.alpah"):
        load_config(SweepConfig, None, None, base={**base, "space": {"finetune.alpah": {"grid": [0.1]}}})
    with pytest.raises(ConfigError, match="alpha"):  # out of [0, 1]
        load_config(SweepConfig, None, None, base={**base, "space": {"finetune.alpha": {"grid": [1.5]}}})
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(SweepConfig, None, None, base={**base, "space": {"knn.k": {"grid": [1], "choice": [2]}}})
    config = _sweep_yaml(tmp_path / "s.yaml", encoder_run, tmp_path, "noval", 1, {"finetune.alpha": {"grid": [0.5]}})
    done = _tune(config, "eval.val_fraction=0")
    assert done.returncode == 2 and "never on test clips" in done.stderr


@pytest.mark.e2e
def test_grid_sweep_writes_its_table_and_a_runnable_best_config(encoder_run, tmp_path):
    space = {"finetune.alpha": {"grid": [0.25, 0.75]}, "finetune.temperature": {"grid": [0.1, 0.3]}}
    config = _sweep_yaml(tmp_path / "grid.yaml", encoder_run, tmp_path / "sweeps", "grid", 1, space)
    done = _tune(config, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "sweeps" / "grid"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {(r["finetune.alpha"], r["finetune.temperature"]) for r in rows} == \
        {(a, t) for a in ("0.25", "0.75") for t in ("0.1", "0.3")}
    scores = [float(r["val_class_averaged_accuracy"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r["epochs"] == "1" for r in rows)
    assert (out / "results.md").read_text().count("\n| ") == 4
    assert done.stderr.count(" done after 1 epoch(s) (finetune.alpha=") == 4, "a line per trial"
    assert len((done.stdout + done.stderr).splitlines()) < 60, "not Ray Tune's tables for every trial"
    assert "snapshotting has been triggered" not in done.stderr and "Checkpoint successfully created" not in done.stderr
    best = out / "best.yaml"
    first = best.read_text().splitlines()[0]
    assert first.startswith("# audioclr eval") and "--config" in first
    cfg = load_config(EvalRoot, best).eval
    assert (cfg.finetune.alpha, cfg.finetune.temperature) == (float(rows[0]["finetune.alpha"]),
                                                              float(rows[0]["finetune.temperature"]))
    # a driver killed while Ray copies its state leaves an empty file: a rerun sets it aside;
    # and a state Ray Tune cannot go on from (long signal fuzzer, seed 2: SIGINT as the trials
    # were made): Ray started the sweep over from no space at all, one trial without an encoder
    (searcher,) = out.glob("basic-variant-state-*.json")
    searcher.write_bytes(b"")
    for state in out.glob("experiment_state-*.json"):
        state.write_text(json.dumps({"trial_data": [["not a trial", "{}"]], "runner_data": {}}))
    over = _tune(config, timeout=600)
    assert over.returncode == 0, over.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}, rows
    ours = "\n".join(own_lines(over.stderr))  # not a Ray worker's
    assert "cannot be resumed" in ours and "Traceback" not in ours, over.stderr[-3000:]
    assert searcher.with_name(searcher.name + ".damaged").is_file()


def _state_records_a_checkpoint(exp_dir) -> bool:
    """True once Ray Tune's experiment snapshot names a trial checkpoint that is still on
    disk (a checkpoint folder alone is not enough: the snapshot that makes it resumable
    follows a moment later, and Ray deletes the older checkpoint before that)."""
    named = 0
    for path in glob.glob(str(exp_dir / "experiment_state-*.json")):
        try:
            trials = json.load(open(path))["trial_data"]
        except (OSError, ValueError, KeyError):
            return False
        for trial in trials:
            trial_id = json.loads(trial[0])["trial_id"]
            for name in re.findall(r'"checkpoint_dir_name": "(checkpoint_\d{6})"', trial[1]):
                if not glob.glob(str(exp_dir / f"run_trial_{trial_id}_*" / name)):
                    return False
                named += 1
    return named > 0


@pytest.mark.e2e
def test_a_killed_sweep_resumes_from_its_checkpoints(encoder_run, tmp_path):
    space = {"finetune.alpha": {"grid": [0.25, 0.75]}}
    config = _sweep_yaml(tmp_path / "kill.yaml", encoder_run, tmp_path / "sweeps", "kill", 10, space)
    cmd = [PYTHON, "-m", "trainer.cli", "tune", "--config", str(config)]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not _state_records_a_checkpoint(tmp_path / "sweeps" / "kill"):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "no trial checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its Ray processes, mid-sweep
    first.wait()
    done = _tune(config, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweeps" / "kill" / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" and r["epochs"] == "10" for r in rows)
    assert max(int(r["resumed_from_epoch"]) for r in rows) >= 1, rows  # continued, not restarted
    changed = _tune(config, "eval.finetune.epochs=11", timeout=120)
    assert changed.returncode == 2 and "other settings" in changed.stderr


def test_a_state_saved_before_any_trial_resumes_only_with_its_searcher(tmp_path, caplog):
    from trainer.tune.ray_cluster import resumable

    assert not resumable(tmp_path)  # nothing saved: a new sweep
    state = tmp_path / "experiment_state-2026-12-08_01-00-00.json"
    state.write_text(json.dumps({"trial_data": [], "runner_data": {}}))
    searcher = tmp_path / "basic-variant-state-2026-12-08_01-00-00.json"
    searcher.write_bytes(b"searcher")
    assert resumable(tmp_path)  # the searcher holds the trials to come
    searcher.unlink()
    assert not resumable(tmp_path) and "before any trial started" in caplog.text
    assert not state.exists() and state.with_name(state.name + ".unused").is_file()
    state.write_text(json.dumps({"trial_data": [["{}", "{}"]], "runner_data": {}}))
    assert resumable(tmp_path)


def test_a_state_save_cut_short_leaves_no_working_file(tmp_path):
    from trainer.tune.ray_cluster import remove_ray_temporaries

    cut = tmp_path / ".76524fbe-9e39-4e2d-a94f-d1d702efb55f-tmp-basic-variant-state-2026-12-08_00-58-53.json"
    kept = [tmp_path / ".validate_storage_marker", tmp_path / ".notes-tmp-mine", tmp_path / "sweep.yaml"]
    for path in (cut, *kept):
        path.write_text("x")
    remove_ray_temporaries(tmp_path)
    assert not cut.exists() and all(p.exists() for p in kept)


def test_trials_whose_last_checkpoint_is_gone_are_restarted():
    from types import SimpleNamespace

    from trainer.tune.ray_cluster import lost_checkpoints

    gone = ValueError("Could not recover from checkpoint as it does not exist on storage anymore. Got ...")
    fine = SimpleNamespace(error=None, metrics={"trial_id": "a"}, path="p")
    other = SimpleNamespace(error=FloatingPointError("loss is nan"), metrics={"trial_id": "b"}, path="p")
    assert not lost_checkpoints([fine, other])
    assert lost_checkpoints([fine, SimpleNamespace(error=gone, metrics={}, path="p")])


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_a_sweep_with_its_table_state_saved_and_128_plus_n(encoder_run, tmp_path, sig):
    space = {"finetune.alpha": {"grid": [0.25, 0.5, 0.75]}}  # one trial at a time: two still pending
    config = _sweep_yaml(tmp_path / "stop.yaml", encoder_run, tmp_path / "sweeps", "stop", 40, space)
    cmd = [PYTHON, "-m", "trainer.cli", "tune", "--config", str(config), "ray.num_cpus=1"]
    first = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 300
    while not _state_records_a_checkpoint(tmp_path / "sweeps" / "stop"):
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.time() < deadline, "no trial checkpoint within 300 s"
        time.sleep(0.2)
    if sig == signal.SIGINT:
        os.killpg(first.pid, sig)  # as a terminal's Ctrl-C: the whole foreground group
    else:
        first.send_signal(sig)  # as kill, docker stop or a scheduler's pre-emption: the command
    out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + sig, err[-3000:]
    assert "| trial |" in out and out.count("not run") == 2, out[-2000:]  # the table so far
    # lines from Ray's trial workers carry a "(run_trial pid=N)" prefix: as Ray tears a worker
    # down it may print an ignored SystemExit of its own; the command itself prints none
    ours = "\n".join(own_lines(err))
    assert "Traceback" not in ours and "Rerun the same command to resume" in ours, err[-3000:]
    assert (tmp_path / "sweeps" / "stop" / "results.csv").is_file()
    if sig == signal.SIGTERM:
        return  # a stop by either signal saves the same state: the resume is shown once
    done = _tune(config, "ray.num_cpus=1", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweeps" / "stop" / "results.csv")))
    assert len(rows) == 3 and all(r["status"] == "ok" and r["epochs"] == "40" for r in rows)
    assert max(int(r["resumed_from_epoch"]) for r in rows) >= 1, rows
    assert len({r["node"] for r in rows}) == 1, "one machine is one node, whichever Ray start ran a trial"
    assert "node" not in (tmp_path / "sweeps" / "stop" / "results.md").read_text().splitlines()[0]


def test_ctrl_c_before_ray_tune_runs_leaves_at_once():
    from dataio.stop_signal import stop_pending
    from trainer.tune.sweep import sweep_stop

    before = signal.getsignal(signal.SIGINT)  # a shell's background job starts with SIGINT ignored
    with pytest.raises(KeyboardInterrupt):  # main() turns it into exit 130 with a message
        with sweep_stop():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler is back"
    # no catcher took it here (main()'s would): out of the block, it is not sent again to
    # whoever handles SIGINT next (here pytest, which would end the session)
    assert stop_pending() == signal.SIGINT
    time.sleep(2.5)  # past the redelivery interval
    from trainer.commands import stop_handled
    stop_handled()


def test_a_best_trial_that_validates_far_above_its_test_is_noted():
    from trainer.tune.results import check_val_against_test
    metric = "class_averaged_accuracy"
    far = [{f"val_{metric}": 0.51, f"test_{metric}": 0.29}, {f"val_{metric}": 0.4, f"test_{metric}": 0.38}]
    assert "validates at 0.510 but tests at 0.290" in check_val_against_test(far, metric)
    assert check_val_against_test(far[1:], metric) == "" and check_val_against_test([], metric) == ""
    assert check_val_against_test([{f"val_{metric}": 0.9, f"test_{metric}": ""}], metric) == ""
