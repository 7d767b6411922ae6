"""``audioclr tune --address``: sweeps on an existing Ray cluster. A two-node cluster (a head
and a worker, one CPU each, as separate Ray nodes on this machine) runs a sweep across both
nodes, the trials read their embeddings from Ray's object store, a trial whose worker process
is killed is retried from its checkpoint, and an address where no cluster answers is an
error within seconds."""

import ast
import csv
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import PYTHON, cli_env
from tests.dist_utils import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster():
    """A Ray head and one worker node: two raylets, one CPU each, so two one-CPU trials
    can only run side by side on different nodes."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "node_name": "head"})
    ray_cluster.add_node(num_cpus=1, node_name="worker")
    ray_cluster.wait_for_nodes()
    yield ray_cluster
    ray_cluster.shutdown()


def _sweep(path, run, name, protocol, space, **eval_cfg):
    cfg = {"name": name, "storage": str(path.parent / "sweeps"), "encoders": [str(run)], "data": str(run / "shards"),
           "protocol": protocol, "space": space, "max_failures": 2,
           "eval": {"val_fraction": 0.25, **eval_cfg}}
    path.write_text("# audioclr tune --config this.yaml --address HEAD:PORT\n" + yaml.safe_dump(cfg))
    return path


def _trial_records(exp_dir):
    """Every result each trial reported, from Ray Tune's result.json files."""
    records = {}
    for path in exp_dir.glob("run_trial_*/result.json"):
        records[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def test_a_sweep_spreads_over_both_nodes_and_embeds_once(encoder_run, cluster, tmp_path):
    config = _sweep(tmp_path / "knn.yaml", encoder_run, "knn", "knn", {"knn.k": {"grid": [1, 3, 5, 7]}})
    done = subprocess.run([PYTHON, "-m", "trainer.cli", "tune", "--config", str(config), "--address", cluster.address],
                          capture_output=True, text=True, env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 node(s)" in done.stderr and "embedded 24 clips with 1 encoder(s)" in done.stderr, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweeps" / "knn" / "results.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {r["node"] for r in rows} == {"head", "worker"}, "one-CPU trials on two one-CPU nodes run on both"
    records = _trial_records(tmp_path / "sweeps" / "knn")
    assert len(records) == 4
    assert all(r["embedded_in_trial"] is False for rs in records.values() for r in rs), \
        "every trial read the embeddings from the object store"


def test_a_trial_whose_worker_is_killed_is_retried_from_its_checkpoint(encoder_run, cluster, tmp_path):
    config = _sweep(tmp_path / "ft.yaml", encoder_run, "ft", "finetune", {"finetune.alpha": {"grid": [0.25, 0.75]}},
                    finetune={"epochs": 100, "batch_size": 4})
    exp_dir, log_path = tmp_path / "sweeps" / "ft", tmp_path / "sweep.log"
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the driver, then the trials
        sweep = subprocess.Popen([PYTHON, "-m", "trainer.cli", "tune", "--config", str(config), "--address",
                                  cluster.address], stdout=log, stderr=subprocess.STDOUT, env=cli_env())
    try:
        deadline = time.time() + 300
        while len(_past_two_epochs(exp_dir)) < 2:
            assert sweep.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "no two trials reached their third epoch within 300 s"
            time.sleep(0.1)
        victims, until = [], time.time() + 20  # a worker's title is set as it takes the task
        while not victims and time.time() < until:
            victims = _pids_named("ray::ImplicitFunc.train") or time.sleep(0.2) or []
        assert victims, "no trial process found"
        os.kill(victims[0], signal.SIGKILL)
        sweep.wait(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 0, log_path.read_text()[-3000:]
    rows = list(csv.DictReader(open(exp_dir / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" and r["epochs"] == "100" for r in rows), rows
    assert max(int(r["resumed_from_epoch"]) for r in rows) >= 2, rows  # continued, not restarted


def _past_two_epochs(exp_dir) -> set[str]:
    """The trials whose kept checkpoint (Ray keeps the last one only) is from epoch 3 on."""
    return {path.parent.name for path in exp_dir.glob("run_trial_*/checkpoint_*")
            if int(path.name.split("_")[1]) >= 2}


def _pids_named(title: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].decode(errors="replace").startswith(title):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_without_an_address_a_sweep_starts_a_ray_of_its_own_beside_a_running_one(cluster):
    """ray.init without an address joins the Ray this machine already runs (``ray start``),
    then refuses ``ray.num_cpus``: the full suite on two workers, a sweep beside this
    module's cluster, exited 2 in Ray's words."""
    code = ("import ray; from trainer.tune.ray_cluster import start_ray, stop_ray; "
            "from trainer.tune.sweep import RayConfig; start_ray(RayConfig(num_cpus=1)); "
            "print(sorted(n['NodeName'] for n in ray.nodes())); stop_ray()")
    out = subprocess.run([PYTHON, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    nodes = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert len(nodes) == 1 and nodes[0] not in ("head", "worker"), nodes


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_no_cluster_answers_is_an_error_within_seconds(encoder_run, tmp_path, scheme):
    config = _sweep(tmp_path / "none.yaml", encoder_run, "none", "knn", {"knn.k": {"grid": [1]}})
    address = f"{scheme}127.0.0.1:{free_port()}"
    start = time.time()
    done = subprocess.run([PYTHON, "-m", "trainer.cli", "tune", "--config", str(config), "--address", address],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    assert time.time() - start < 30
    assert done.returncode == 2 and f"no Ray cluster answers at {address}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
