"""Markdown tables of a sweep: every run, and a value grouped by two settings."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from loopedlm.experiments.report.runs import setting


def mean_std(values: list[float]) -> str:
    """'mean ± std' of the finite values (one value alone; '-' when there are none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def format_number(value: Any, digits: int = 4) -> str:
    """A number with `digits` decimals ('inf' and 'nan' as such); '-' for anything else."""
    if isinstance(value, int | float) and value is not None:
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return "-"


def runs_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | status | steps | final loss | val BPB | collapse check | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run["summary"] or {}
        col = (s.get("collapse") or {}).get("status", "-")
        loss = s.get("final_loss")
        lines.append(f"| {run['name']} | {s.get('status', 'not run')} | {s.get('step', '-')} | "
                     f"{format_number(loss)} | {format_number(s.get('val_bpb'))} | {col} | "
                     f"{format_number(s.get('total_wall_time_s'), 0)} |")
    return "\n".join(lines) + "\n"


def grouped_table(runs, row_key: str, col_key: str, value_fn, title: str) -> str:
    """`value_fn(run)` as mean ± std over seeds, one row per value of `row_key` and one
    column per value of `col_key`."""
    rows = sorted({json.dumps(setting(r, row_key)) for r in runs})
    cols = sorted({setting(r, col_key) for r in runs}, key=lambda v: (str(type(v)), v))
    head = f"| {row_key.rpartition('.')[2]} \\ {col_key.rpartition('.')[2]} | " + " | ".join(
        str(c) for c in cols) + " |"
    out = [f"**{title}** (mean ± std over seeds; '-' = collapsed or missing)\n", head,
           "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        cells = []
        for col in cols:
            members = [r for r in runs if json.dumps(setting(r, row_key)) == row
                       and setting(r, col_key) == col]
            cells.append(mean_std([value_fn(r) for r in members]) if members else "")
        out.append(f"| {json.loads(row)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
