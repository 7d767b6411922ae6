"""tools/gpu_check.sh on a machine without a GPU: every stage runs or says why not, under
its time limit, and one JSON and one text report come out."""

import json
import subprocess

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.e2e

STAGES = ["cuda_tests", "dali_gpu_mel_vs_torch", "corpus", "bench_data", "bench_train_formats",
          "bench_train_resnet50", "bench_train_resnet18_compiled", "torchrun_nccl_2gpu"]


def test_gpu_check_runs_what_it_can_and_names_what_it_cannot(tmp_path):
    out = subprocess.run([str(REPO / "tools" / "gpu_check.sh"), str(tmp_path / "check"), "--quick", "--budget", "240"],
                         env=cli_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert list(report["stages"]) == STAGES
    stages = report["stages"]
    assert stages["cuda_tests"]["status"] == "skipped: no CUDA device"
    assert stages["torchrun_nccl_2gpu"]["status"] == "skipped: 0 GPU(s): needs 2"
    assert stages["bench_train_resnet18_compiled"]["status"] == "skipped: torch.compile takes minutes on a CPU"
    for name in ("corpus", "bench_data", "bench_train_formats", "bench_train_resnet50"):
        assert stages[name]["status"] == "ok", stages[name].get("tail")
    rows = stages["bench_train_formats"]["result"]["rows"]
    assert {"bare", "synthetic", "torch flac", "torch pcm16", "torch logmel"} <= set(rows)
    assert rows["synthetic"]["vs_bare"] > 0 and all("vs_synthetic" in rows[f"torch {f}"] for f in ("flac", "logmel"))
    formats = stages["bench_data"]["result"]["formats"]["rows"]
    assert set(formats) == {"flac", "pcm16", "logmel"} and formats["pcm16"]["bytes_vs_flac"] > 1
    text = (tmp_path / "check" / "report.txt").read_text()
    assert all(name in text for name in STAGES)
