"""tools/quality_table.py: one Markdown row per bench quality result."""

import json

import pytest

from tools.quality_table import main


def _result(seeds, per_fold=False):
    def stat(mean, std):
        return {"mean": mean, "std": std, "seeds": [mean] * len(seeds)}

    return {"data": "../shared/data/percussion/meta.csv", "config": "configs/demo_supcon.yaml",
            "overrides": ["optim.lr=0.05"], "epochs": 30, "seeds": seeds, "pretrained_per_fold": per_fold,
            "summary": {"linear": stat(0.8512, 0.0101), "knn": stat(0.7, 0.02),
                        "linear_random_init": stat(0.8011, 0.0), "knn_random_init": stat(0.47, 0.0)},
            "handcrafted": {"class_averaged_accuracy": 0.8464}, "timing": {"pretrain_seconds": {"0": 60.0, "1": 120.0}}}


def test_a_row_per_result_with_gain_and_minutes(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "quality.json").write_text(json.dumps(_result([0, 1], per_fold=True)))
    (tmp_path / "b.json").write_text(json.dumps(_result([0])))
    assert main([str(tmp_path / "a"), str(tmp_path / "b.json"), "--out", str(tmp_path / "t.md")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows == (tmp_path / "t.md").read_text().splitlines() and len(rows) == 4
    first = [c.strip() for c in rows[2].split("|")[1:-1]]
    assert first == ["`demo_supcon.yaml` `optim.lr=0.05` (one encoder per held-out fold)", "percussion", "30, 0,1",
                     "0.851 +- 0.010", "0.700 +- 0.020", "0.801 / 0.470", "0.846", "+0.050", "1.5"]
    assert rows[3].split("|")[4].strip() == "0.851", "one seed: no spread"


def test_a_folder_without_a_result_is_named(tmp_path):
    with pytest.raises(SystemExit, match="not a readable bench quality result"):
        main([str(tmp_path)])
