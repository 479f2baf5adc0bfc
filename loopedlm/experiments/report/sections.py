"""The FLT paper's experiments, one report section each: loop scaling (Table 1),
stability (Figure 2), attention variants (Table 2) and test-time loops (Figure 5).
Each takes the finished runs, the folder for figures and the caption's command, and
returns the section's Markdown parts."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from loopedlm.experiments.report.figures import figure_curves, figure_xy
from loopedlm.experiments.report.runs import (
    collapsed,
    eval_loops,
    eval_metric,
    eval_metric_names,
    label,
    seed_groups,
    setting,
    val_bpb,
    varying_keys,
)
from loopedlm.experiments.report.tables import format_number, grouped_table, mean_std


def section_loop_scaling(runs, out: Path, cmd: str) -> list[str]:
    parts = [grouped_table(runs, "model.loop_mode", "model.n_loops", val_bpb,
                           "Validation bits-per-byte (Table 1's val BPB column)")]
    for metric in eval_metric_names(runs):
        parts.append(grouped_table(
            runs, "model.loop_mode", "model.n_loops",
            lambda r, m=metric: eval_metric(r, setting(r, "model.n_loops"), m),
            f"{metric} at the trained loop count"))
    lines = defaultdict(lambda: ([], []))
    for run in sorted(runs, key=lambda r: setting(r, "model.n_loops") or 0):
        bpb = val_bpb(run)
        if bpb is not None:
            xs, ys = lines[str(setting(run, "model.loop_mode"))]
            xs.append(setting(run, "model.n_loops"))
            ys.append(bpb)
    parts.append(figure_xy(dict(lines), out / "loop_scaling_bpb.png",
                           "Validation BPB against loop count, per loop mode",
                           "loops N (train = eval)", "val BPB", cmd))
    return parts


def section_stability(runs, out: Path, cmd: str) -> list[str]:
    keys = varying_keys(runs)
    parts = [figure_curves(runs, keys, out / "stability_curves.png",
                           "Training loss, last-loop residual-state norm and first-MLP gradient "
                           "norm against step", cmd,
                           [("loss", "training loss", None, False),
                            ("residual_norm", "residual norm (last loop)", None, True),
                            ("grad_norm/first_mlp", "grad norm, first block MLP", None, True)]),
             figure_curves(runs, keys, out / "stability_residual_loop1.png",
                           "Residual-state norm of loop 1 against step", cmd,
                           [("residual_norm", "residual norm (loop 1)", 0, True)])]
    table = ["| configuration | seeds | collapsed (detector) | flagged | val BPB |",
             "|---|---|---|---|---|"]
    for members in seed_groups(runs).values():
        n_collapsed = sum((r["summary"] or {}).get("status") == "collapsed" for r in members)
        n_flagged = sum(collapsed(r) for r in members)
        table.append(f"| {label(members[0], keys)} | {len(members)} | {n_collapsed} | "
                     f"{n_flagged} | {mean_std([val_bpb(r) for r in members])} |")
    parts.append("**Collapse by configuration** (collapsed = the run stopped on a non-finite "
                 "loss; flagged = plateau or severe swings reported by the detector)\n\n"
                 + "\n".join(table) + "\n")
    return parts


def section_attention(runs, out: Path, cmd: str) -> list[str]:
    keys = varying_keys(runs)
    table = ["| variant | params | val BPB |", "|---|---|---|"]
    for members in seed_groups(runs).values():
        params = (members[0]["summary"] or {}).get("params", "-")
        table.append(f"| {label(members[0], keys) or 'full'} | {params} | "
                     f"{mean_std([val_bpb(r) for r in members])} |")
    return ["**Attention variants with FLT (Table 2)**\n\n" + "\n".join(table) + "\n",
            figure_curves(runs, keys, out / "attention_loss.png",
                          "Training loss of FLT with each attention variant", cmd,
                          [("loss", "training loss", None, False)])]


def _test_time_lines(runs, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """`metric` against the test-time loop count, one line per run."""
    lines = {}
    for run in sorted(runs, key=lambda r: setting(r, "model.n_loops") or 0):
        xs = [n for n in eval_loops(run) if eval_metric(run, n, metric) is not None]
        if xs:
            name = f"{setting(run, 'model.loop_mode')} trained N={setting(run, 'model.n_loops')}"
            lines[name + f" seed={run['settings'].get('seed', 0)}"] = (
                xs, [eval_metric(run, n, metric) for n in xs])
    return lines


def section_test_time(runs, out: Path, cmd: str) -> list[str]:
    parts = []
    metrics = eval_metric_names(runs) or []
    for metric in metrics:
        lines = _test_time_lines(runs, metric)
        all_loops = sorted({n for xs, _ in lines.values() for n in xs})
        table = [f"**{metric}** by trained (rows) and test-time (columns) loop count\n",
                 "| trained \\ test-time | " + " | ".join(str(n) for n in all_loops) + " |",
                 "|---" * (len(all_loops) + 1) + "|"]
        for name, (xs, ys) in lines.items():
            values = dict(zip(xs, ys, strict=True))
            table.append(f"| {name} | "
                         + " | ".join(format_number(values.get(n)) for n in all_loops) + " |")
        parts.append("\n".join(table) + "\n")
        safe = "".join(c if c.isalnum() else "_" for c in metric)
        parts.append(figure_xy(lines, out / f"test_time_{safe}.png",
                               f"{metric} against test-time loops, per trained loop count",
                               "test-time loops N", metric, cmd))
    if not metrics:
        parts.append("No evaluation results found (eval/results.json) in this sweep.\n")
    return parts
