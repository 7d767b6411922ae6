"""Learning on real recordings: pretraining on ../shared/data/instruments (real sampled
instruments, folds = unseen instruments) must beat the same encoder at random init.

Not in the default run (it needs the development set next to the repository and a few
minutes): ``python3 -m pytest -m real_audio``.
"""

import json
import subprocess

import pytest

from tests.conftest import PYTHON, REPO, cli_env

pytestmark = pytest.mark.e2e

INSTRUMENTS = REPO.parent / "shared" / "data" / "instruments" / "meta.csv"


@pytest.mark.real_audio
@pytest.mark.skipif(not INSTRUMENTS.is_file(), reason=f"needs the real-audio set at {INSTRUMENTS}")
def test_demo_recipe_learns_what_a_linear_probe_can_use_on_real_instruments(tmp_path):
    out = subprocess.run([PYTHON, "-m", "trainer.cli", "bench", "quality", "--csv", str(INSTRUMENTS),
                          "--config", str(REPO / "configs" / "demo.yaml"), "--epochs", "30", "--seeds", "0",
                          "--out", str(tmp_path / "q"), "train.progress=false"],
                         env=cli_env(), capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    summary = json.loads((tmp_path / "q" / "quality.json").read_text())["summary"]
    assert summary["linear"]["mean"] > summary["linear_random_init"]["mean"] + 0.08
    assert summary["knn"]["mean"] > summary["knn_random_init"]["mean"] + 0.05
