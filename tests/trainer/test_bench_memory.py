"""``audioclr bench memory`` on a tiny model: the measured per-rank model state splits the way
DDP and ZeRO-1/3 say it does (2 gloo ranks on CPU)."""

import json
import subprocess

import pytest

from tests.conftest import PYTHON, cli_env

pytestmark = pytest.mark.e2e

pytest.importorskip("deepspeed")


def near(value: float, expected: float, rel: float = 0.15) -> bool:
    return abs(value - expected) <= rel * expected


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str]:
    """One run: width-8 ResNet-18 with a small head, DDP, ZeRO-1 and ZeRO-3. ZeRO-3 keeps
    parameters under 1e5 elements whole by default (all of them, at this size): 0 turns
    that off so its parameters are split."""
    out = tmp_path_factory.mktemp("bench_memory") / "memory.json"
    ds_config = json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    run = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "memory", "--encoders", "resnet18",
                          "--stages", "ddp,1,3", "--width", "8", "--proj-hidden", "32", "--proj-dim", "16",
                          "--batch", "4", "--mels", "32", "--frames", "32", "--bucket", "1000000",
                          "--ds-config", ds_config, "--device", "cpu", "--timeout", "120", "--out", str(out)],
                         env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


def test_every_configuration_is_measured_and_tabled(report):
    result, stdout = report
    rows = {r["engine"]: r for r in result["results"]}
    assert set(rows) == {"ddp", "zero1", "zero3"} and result["world"] == 2
    for name, row in rows.items():
        assert len(row["ranks"]) == 2
        s = row["measured"]
        assert s["params"] > 0 and s["grads"] > 0 and s["optim"] > 0 and s["peak_delta"] > 0
        assert s["total"] >= sum(s[c] for c in result["categories"]) - 1  # other: what is left
        assert s["after_step"] <= s["total"]
        assert f"| resnet18 | {name} |" in stdout
    assert rows["ddp"]["deepspeed"] is None and rows["zero1"]["deepspeed"] > 0 and rows["zero3"]["deepspeed"] > 0
    assert "Estimated memory needed" in rows["zero3"]["deepspeed_text"]


def test_zero_splits_what_its_stage_says(report):
    rows = {r["engine"]: r["measured"] for r in report[0]["results"]}
    param_bytes = 4 * report[0]["results"][0]["params"]
    ddp, zero1, zero3 = rows["ddp"], rows["zero1"], rows["zero3"]
    assert near(ddp["params"], param_bytes, 0.02) and near(ddp["optim"], param_bytes, 0.02)
    assert ddp["master"] == 0 and ddp["buckets"] >= 0.9 * param_bytes  # DDP's reducer copy of the grads
    assert near(zero1["params"], param_bytes, 0.05)  # whole on every rank
    assert near(zero1["optim"], ddp["optim"] / 2)  # momentum: this rank's half
    assert near(zero1["master"], param_bytes / 2)  # DeepSpeed's fp32 master partition
    assert near(zero3["params"], ddp["params"] / 2)
    assert near(zero3["optim"], ddp["optim"] / 2) and near(zero3["grads"], ddp["grads"] / 2)


def test_a_failing_configuration_is_reported_not_raised(tmp_path):
    out = tmp_path / "memory.json"
    run = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "memory", "--encoders", "resnet18", "--stages",
                          "1", "--width", "8", "--batch", "4", "--mels", "32", "--frames", "32",
                          "--ds-config", '{"no_such_key": 1}', "--device", "cpu", "--timeout", "120",
                          "--out", str(out)], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    row = json.loads(out.read_text())["results"][0]
    assert "no_such_key" in row["failed"] and "FAILED" in run.stdout
