"""The recipe x set table of ``audioclr bench quality`` results, as Markdown.

    python3 tools/quality_table.py runs/q_moco_perc runs/q_moco_inst ... [--out table.md]

Each argument is a benchmark's output folder (or its ``quality.json``). One row per result,
in the order given: the recipe with its overrides, the set, the budget, linear probe and
kNN of the pretrained encoder and of its random init (mean +- std over seeds), the
hand-crafted baseline, the linear gain over random init, and the pretraining wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADER = ("| recipe | set | epochs, seeds | linear | kNN | random init linear / kNN | hand-crafted "
          "| gain (linear) | pretraining, min per seed |\n|---|---|---|---|---|---|---|---|---|")


def load_result(path: Path) -> dict:
    """``path`` is a folder holding ``quality.json``, or the file itself."""
    path = path / "quality.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: not a readable bench quality result ({exc})") from None


def set_name(result: dict) -> str:
    """The data set's name: the CSV's folder (``.../percussion/meta.csv`` -> percussion)."""
    data = Path(result["data"])
    return data.parent.name if data.suffix == ".csv" else data.name


def row(result: dict) -> str:
    s = result["summary"]
    recipe = f"`{Path(result['config']).name}`"
    if result.get("overrides"):
        recipe += " " + " ".join(f"`{o}`" for o in result["overrides"])
    if result.get("pretrained_per_fold"):
        recipe += " (one encoder per held-out fold)"
    seeds = result["seeds"]
    minutes = [v / 60 for v in result["timing"]["pretrain_seconds"].values() if v]
    spent = f"{sum(minutes) / len(minutes):.1f}" if minutes else "reused"

    def score(key: str) -> str:
        return f"{s[key]['mean']:.3f} +- {s[key]['std']:.3f}" if len(seeds) > 1 else f"{s[key]['mean']:.3f}"

    gain = s["linear"]["mean"] - s["linear_random_init"]["mean"]
    return (f"| {recipe} | {set_name(result)} | {result['epochs']}, {','.join(map(str, seeds))} "
            f"| {score('linear')} | {score('knn')} "
            f"| {s['linear_random_init']['mean']:.3f} / {s['knn_random_init']['mean']:.3f} "
            f"| {result['handcrafted']['class_averaged_accuracy']:.3f} | {gain:+.3f} | {spent} |")


def table(paths: list[Path]) -> str:
    return "\n".join([HEADER, *(row(load_result(p)) for p in paths)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="bench quality output folders or quality.json files")
    p.add_argument("--out", type=Path, help="write the table here as well as to the screen")
    args = p.parse_args(argv)
    text = table(args.results)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
