"""A sweep's results: one row per trial, best first, as ``results.csv`` and ``results.md``."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

from dataio.atomic import write_text_atomically

log = logging.getLogger("audioclr.tune")


def result_rows(results, cfg, metric: str) -> list[dict]:
    """One row per trial (``cfg``: the sweep): its parameters, epochs run, last validation and test metrics,
    sorted best first (errored trials last)."""
    rows = []
    for r in results:
        m, config = r.metrics or {}, r.config or {}  # a trial a stop left pending has neither
        row = {"trial": m.get("trial_id", Path(str(r.path)).name),
               "status": "error" if r.error else "ok" if "epoch" in m else "not run"}
        row["encoder"] = config.get("encoder", "")
        row.update({k: config.get(k, "") for k in cfg.space})
        row["epochs"] = m.get("epoch", 0)
        row["resumed_from_epoch"] = m.get("start_epoch", 0)
        row["node"] = m.get("node", "")
        row.update({k: m[k] for k in sorted(m) if k.startswith(("val_", "test_"))})
        rows.append(row)
    key = f"val_{metric}"
    sign = -1 if cfg.mode == "max" else 1

    def order(row: dict) -> tuple:
        v = row.get(key)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (0 if ok else 1, sign * v if ok else 0.0)

    return sorted(rows, key=order)


VAL_TEST_GAP = 0.1  # validation above test by more than this is worth a line


def check_val_against_test(rows: list[dict], metric: str) -> str:
    """A line (logged, and returned) when the best trial validates far above its test score:
    the validation clips then share something with training (a speaker, a kit, a source
    recording) that the test clips do not, and the ranking may not hold on new data."""
    best = rows[0] if rows else {}
    val, test = best.get(f"val_{metric}"), best.get(f"test_{metric}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (val, test)) or val - test <= VAL_TEST_GAP:
        return ""
    line = (f"the best trial validates at {val:.3f} but tests at {test:.3f}: its validation clips may share groups "
            f"(speakers, instruments, kits, source recordings) with its training clips. Give the shards folds "
            f"that are groups (validation is then a whole fold) or a 'val' split of their own")
    log.warning(line)
    return line


def fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_tables(rows: list[dict], exp_dir: Path) -> tuple[Path, Path]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = write_text_atomically(exp_dir / "results.csv", table.getvalue())
    # a column every trial shares (one encoder, one node) is left out of the Markdown table
    shown = [c for c in columns if c not in ("encoder", "node") or len({r.get(c) for r in rows}) > 1]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [Path(str(row.get(c, ""))).name if c == "encoder" else fmt(row.get(c, "")) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return csv_path, write_text_atomically(exp_dir / "results.md", "\n".join(lines) + "\n")
