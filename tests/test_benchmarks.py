"""The benchmarks run (their numbers are quoted from real runs, not asserted here)."""

import argparse
import importlib.util
import subprocess

from tests.conftest import PYTHON, REPO, cli_env


def test_bench_data_reports_each_backend_against_the_limit(tiny_shards, capsys):
    from dataio.bench import print_table, run

    backends = "torch,dali" if importlib.util.find_spec("nvidia.dali") else "torch"
    args = argparse.Namespace(shards=str(tiny_shards), clips=0, clip_seconds=0, cores=1, backends=backends,
                              batch_size=4, pairs=1, seconds=0.5, out=None)
    result = run(args)
    assert set(result["clips_per_second"]) == {"decode_limit", *backends.split(",")}
    assert all(v > 0 for v in result["clips_per_second"].values())
    print_table(result)
    assert "decode_limit" in capsys.readouterr().out


def test_bench_gradcache_runs(tmp_path):
    out = subprocess.run([PYTHON, str(REPO / "tools" / "bench_gradcache.py"), "--batches", "8", "--cached", "16",
                          "--chunk", "8", "--width", "4", "--seconds", "0.2"],
                         env=cli_env(), capture_output=True, text=True, check=True)
    rows = out.stdout.strip().splitlines()
    assert len(rows) == 3 and rows[-1].split()[:2] == ["16", "8"]
