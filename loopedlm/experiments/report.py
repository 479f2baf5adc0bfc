"""`loopedlm report SWEEP_DIR`: the paper's tables and figures from a finished sweep.

Reads SWEEP_DIR/sweep.json (written by `loopedlm sweep`), each run's summary.json and
log.jsonl, and each run's eval/results.json when present, and writes
SWEEP_DIR/report.md with PNG figures beside it. Every figure is titled with what it
shows and captioned with the exact commands that made it. Seeds are aggregated as
mean +- standard deviation (and min..max bands in figures).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopedlm.train.run_log import read_log

EXPERIMENTS = ("loop_scaling", "stability", "attention", "test_time", "residual_scaling",
               "variable_loops", "custom")


def _finish_figure(fig, ax, path: Path, title: str, caption: str) -> str:
    """Grid, legend and title; save `path` and return its Markdown (figure + caption)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{title}]({path.name})\n\n*{title}.* {caption}\n"


# ---- reading a sweep -----------------------------------------------------------
def load_runs(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    manifest_path = sweep_dir / "sweep.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} does not exist: run `loopedlm sweep` first")
    manifest = json.loads(manifest_path.read_text())
    runs = []
    for row in manifest["runs"]:
        run_dir = sweep_dir / row["name"]
        run = {"name": row["name"], "settings": row["settings"], "dir": run_dir,
               "summary": _read_json(run_dir / "summary.json"),
               "eval": _read_json(run_dir / "eval" / "results.json"), "log": []}
        if (run_dir / "log.jsonl").exists():
            run["log"] = read_log(run_dir)
        runs.append(run)
    return manifest, runs


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def setting(run: dict[str, Any], key: str, default: Any = None) -> Any:
    """A run's value for `key` (e.g. 'model.n_loops'), falling back to its saved config."""
    if key in run["settings"]:
        return run["settings"][key]
    config = _read_json(run["dir"] / "config.json") or {}
    section, _, leaf = key.rpartition(".")
    node = config.get("train", config)
    if section:
        node = node.get(section, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and leaf in node:
        return node[leaf]
    if section == "model":
        model = config.get("model", {})
        return model.get(leaf, default)
    return default


def group_key(run: dict[str, Any]) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in run["settings"].items() if k != "seed"))


def label(run: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.rpartition('.')[2]}={setting(run, k)}" for k in keys)


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["settings"] if k != "seed"})
    return [k for k in keys if len({json.dumps(r["settings"].get(k)) for r in runs}) > 1]


def val_bpb(run: dict[str, Any]) -> float | None:
    s = run["summary"]
    if s and s.get("status") == "completed" and s.get("val_bpb") is not None:
        return float(s["val_bpb"])
    return None


def collapsed(run: dict[str, Any]) -> bool:
    s = run["summary"] or {}
    return s.get("status") == "collapsed" or (s.get("collapse") or {}).get("status") not in (
        None, "ok", "stable")


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def eval_metric(run: dict[str, Any], n_loops: int, metric: str) -> float | None:
    """A metric of eval/results.json (`metrics[name][str(n_loops)]`) or None if absent."""
    value = ((run["eval"] or {}).get("metrics", {}).get(metric) or {}).get(str(n_loops))
    return float(value) if isinstance(value, int | float) else None


def eval_loops(run: dict[str, Any]) -> list[int]:
    return sorted((run["eval"] or {}).get("loops", []))


def eval_metric_names(runs: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for metric in (run["eval"] or {}).get("metrics", {}):
            if metric not in names:
                names.append(metric)
    return names


# ---- figures ---------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(run: dict[str, Any], key: str, index: int | None = None):
    steps, values = [], []
    for rec in run["log"]:
        if key not in rec or rec.get("step") is None:
            continue
        value = rec[key]
        if isinstance(value, list):
            if not value:
                continue
            value = value[index if index is not None else -1] if (
                index is None or index < len(value)) else None
        if isinstance(value, int | float) and value is not None:
            steps.append(rec["step"])
            values.append(float(value))
    return steps, values


def figure_curves(runs, keys, path: Path, title: str, caption: str,
                  panels: list[tuple[str, str, int | None, bool]]) -> str:
    """One panel per (log key, y label, loop index, log-scale); one line per group of seeds
    (mean), with the min..max band over seeds."""
    plt = _plt()
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        groups[group_key(run)].append(run)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (key, ylabel, index, log_y) in zip(axes[0], panels, strict=True):
        for members in groups.values():
            curves = [_series(r, key, index) for r in members]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            length = min(len(c[0]) for c in curves)
            steps = curves[0][0][:length]
            stack = [[c[1][i] for c in curves] for i in range(length)]
            finite = [[v for v in col if math.isfinite(v)] or [float("nan")] for col in stack]
            mean = [statistics.mean(col) for col in finite]
            line, = ax.plot(steps, mean, label=label(members[0], keys) or members[0]["name"])
            if len(curves) > 1:
                ax.fill_between(steps, [min(c) for c in finite], [max(c) for c in finite],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{title}]({path.name})\n\n*{title}.* {caption}\n"


def figure_xy(lines: dict[str, tuple[list[float], list[float]]], path: Path, title: str,
              xlabel: str, ylabel: str, caption: str, log_x: bool = False,
              errors: dict[str, list[float]] | None = None) -> str:
    """One line per name (optionally with error bars `errors[name]`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in lines.items():
        ax.errorbar(xs, ys, yerr=(errors or {}).get(name), marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    return _finish_figure(fig, ax, path, title, caption)


# ---- sections ----------------------------------------------------------------------
def runs_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| run | status | steps | final loss | val BPB | collapse check | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        s = run["summary"] or {}
        col = (s.get("collapse") or {}).get("status", "-")
        loss = s.get("final_loss")
        lines.append(f"| {run['name']} | {s.get('status', 'not run')} | {s.get('step', '-')} | "
                     f"{_fmt(loss)} | {_fmt(s.get('val_bpb'))} | {col} | "
                     f"{_fmt(s.get('total_wall_time_s'), 0)} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, int | float) and value is not None:
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return "-"


def grouped_table(runs, row_key: str, col_key: str, value_fn, title: str) -> str:
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
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        groups[group_key(run)].append(run)
    for members in groups.values():
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
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        groups[group_key(run)].append(run)
    for members in groups.values():
        params = (members[0]["summary"] or {}).get("params", "-")
        table.append(f"| {label(members[0], keys) or 'full'} | {params} | "
                     f"{mean_std([val_bpb(r) for r in members])} |")
    return ["**Attention variants with FLT (Table 2)**\n\n" + "\n".join(table) + "\n",
            figure_curves(runs, keys, out / "attention_loss.png",
                          "Training loss of FLT with each attention variant", cmd,
                          [("loss", "training loss", None, False)])]


def section_test_time(runs, out: Path, cmd: str) -> list[str]:
    parts = []
    metrics = eval_metric_names(runs) or []
    for metric in metrics:
        lines = {}
        for run in sorted(runs, key=lambda r: setting(r, "model.n_loops") or 0):
            xs = [n for n in eval_loops(run) if eval_metric(run, n, metric) is not None]
            if xs:
                name = f"{setting(run, 'model.loop_mode')} trained N={setting(run, 'model.n_loops')}"
                lines[name + f" seed={run['settings'].get('seed', 0)}"] = (
                    xs, [eval_metric(run, n, metric) for n in xs])
        all_loops = sorted({n for xs, _ in lines.values() for n in xs})
        table = [f"**{metric}** by trained (rows) and test-time (columns) loop count\n",
                 "| trained \\ test-time | " + " | ".join(str(n) for n in all_loops) + " |",
                 "|---" * (len(all_loops) + 1) + "|"]
        for name, (xs, ys) in lines.items():
            values = dict(zip(xs, ys, strict=True))
            table.append(f"| {name} | " + " | ".join(_fmt(values.get(n)) for n in all_loops)
                         + " |")
        parts.append("\n".join(table) + "\n")
        safe = "".join(c if c.isalnum() else "_" for c in metric)
        parts.append(figure_xy(lines, out / f"test_time_{safe}.png",
                               f"{metric} against test-time loops, per trained loop count",
                               "test-time loops N", metric, cmd))
    if not metrics:
        parts.append("No evaluation results found (eval/results.json) in this sweep.\n")
    return parts


# ---- residual scaling (the second paper; SPEC 4) ---------------------------------
SCALING_LABELS = {"none": "1", "inv_sqrt_loops": "1/sqrt N", "inv_loops": "1/N",
                  "lambda_loops_sqrt_depth": "lambda/N sqrt L"}  # no parentheses: figure titles
ONE_OVER_N = ("lambda_loops_sqrt_depth", "inv_loops")  # the paper's 1/N-type scalings


def parabola_minimum(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """The vertex (x, y) of the parabola through the grid minimum and its two neighbours,
    or None when the minimum lies on the edge of the grid (or the three are not convex)."""
    i = ys.index(min(ys))
    if i == 0 or i == len(ys) - 1:
        return None
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], ys[i - 1:i + 2]
    # Lagrange form: y = a x^2 + b x + c
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    a = y0 / d0 + y1 / d1 + y2 / d2
    b = -(y0 * (x1 + x2) / d0 + y1 * (x0 + x2) / d1 + y2 * (x0 + x1) / d2)
    if a <= 0:
        return None
    x = -b / (2 * a)
    y = y0 * (x - x1) * (x - x2) / d0 + y1 * (x - x0) * (x - x2) / d1 + y2 * (x - x0) * (x - x1) / d2
    return x, y


@dataclass
class LrCurve:
    """Val BPB against log2(lr multiplier) for one (loop mode, scaling, horizon, N), over
    seeds."""

    mode: str
    scale: str
    steps: Any
    n_loops: int
    points: dict[float, list[float]]  # log2 multiplier -> val BPB per seed
    failed: list[float]  # log2 multipliers whose runs gave no val BPB (collapsed, missing)

    @property
    def xs(self) -> list[float]:
        return sorted(self.points)

    @property
    def means(self) -> list[float]:
        return [statistics.mean(self.points[x]) for x in self.xs]

    @property
    def best(self) -> float:
        return self.xs[self.means.index(min(self.means))]

    @property
    def at_edge(self) -> bool:
        return self.best in (self.xs[0], self.xs[-1])

    @property
    def optimum(self) -> tuple[float, float] | None:
        return parabola_minimum(self.xs, self.means)

    @property
    def best_x(self) -> float:
        """The interpolated optimum in log2 units (the grid minimum when at the edge)."""
        return self.optimum[0] if self.optimum else self.best

    def seeds_at(self, x: float) -> list[float]:
        return self.points[x]


def lr_curves(runs: list[dict[str, Any]]) -> list[LrCurve]:
    groups: dict[tuple, LrCurve] = {}
    for run in runs:
        key = (str(setting(run, "model.loop_mode")),
               str(setting(run, "model.residual_scale", "none")), setting(run, "steps"),
               setting(run, "model.n_loops"))
        curve = groups.setdefault(key, LrCurve(*key, points={}, failed=[]))
        x = math.log2(float(setting(run, "optim.lr_scale", 1.0)))
        bpb = val_bpb(run)
        if bpb is None or not math.isfinite(bpb):
            curve.failed.append(x)
        else:
            curve.points.setdefault(x, []).append(bpb)
    return sorted((c for c in groups.values() if c.points),
                  key=lambda c: (c.mode, c.scale, -(c.steps or 0), c.n_loops))


def _mult(x: float) -> str:
    """A log2 multiplier as a readable factor: 1/8x, 1x, 2.83x."""
    value = 2.0 ** x
    if abs(x - round(x)) < 1e-9:
        return f"{value:g}x" if x >= 0 else f"1/{2.0 ** -x:g}x"
    return f"{value:.3g}x"


def _bpb_at(curve: LrCurve, x: float) -> str:
    vals = curve.seeds_at(x)
    return f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}"
                                              if len(vals) > 1 else "") + f" (n={len(vals)})"


def _noise(curve: LrCurve) -> float:
    vals = curve.seeds_at(curve.best)
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def _figure_lr(curves: list[LrCurve], path: Path, title: str, caption: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    loops = sorted({c.n_loops for c in curves})
    horizons = sorted({c.steps for c in curves if c.steps is not None}, reverse=True)
    for curve in curves:
        color = colors[loops.index(curve.n_loops) % len(colors)]
        style = "-" if curve.steps in (None, *horizons[:1]) else "--"
        xs = [2.0 ** x for x in curve.xs]
        lows = [min(curve.points[x]) for x in curve.xs]
        highs = [max(curve.points[x]) for x in curve.xs]
        ax.plot(xs, curve.means, ls=style, marker="o", ms=3.5, color=color,
                label=f"N={curve.n_loops}" + (f", {curve.steps} steps" if horizons else ""))
        ax.fill_between(xs, lows, highs, color=color, alpha=0.12 if style == "-" else 0.06)
        if curve.optimum:
            ax.plot([2.0 ** curve.optimum[0]], [curve.optimum[1]], marker="*", ms=11,
                    color=color, ls="none", markeredgecolor="black", markeredgewidth=0.5)
        for x in curve.failed:
            ax.axvline(2.0 ** x, color=color, ls=":", alpha=0.4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning-rate multiplier (every group's rate)")
    ax.set_ylabel("val BPB")
    return _finish_figure(fig, ax, path, title, caption)


def section_residual_scaling(runs, out: Path, cmd: str) -> list[str]:
    """Val BPB against the learning-rate multiplier per residual scaling, loop count and
    horizon; the grid and interpolated optimum of each curve; and one sentence per claim
    of the residual-scaling paper, decided from the numbers."""
    curves = lr_curves(runs)
    if not curves:
        return ["No finished runs with a validation BPB.\n"]
    modes = sorted({c.mode for c in curves})
    parts, table, shifts, claims = [], [], [], []
    for mode in modes:
        sub = [c for c in curves if c.mode == mode]
        prefix = f"{mode}, " if len(modes) > 1 else ""
        parts += _lr_figures(sub, out, cmd, mode if len(modes) > 1 else "")
        table += [_table_row(c) for c in sub]
        shifts += [f"- {prefix}{line}" for line in _shift_lines(sub)]
        claims += [f"- {prefix}{line}" for line in claim_sentences(sub)]
    head = ["| loop_mode | residual_scale | steps | N | best multiplier (grid) | val BPB at best, "
            "mean ± std (seeds) | interpolated optimum | val BPB there |",
            "|---|---|---|---|---|---|---|---|"]
    return ["**Best learning-rate multiplier per residual scaling and loop count** "
            "(multipliers apply to every base rate of the recipe; the interpolated optimum is "
            "the vertex of the parabola through the three grid points around the minimum, in "
            "log2 of the multiplier)\n\n" + "\n".join(head + table) + "\n",
            "**Does the optimum move with N?**\n\n" + "\n".join(shifts) + "\n",
            "**The paper's claims at this scale**\n\n" + "\n".join(claims) + "\n", *parts]


def _table_row(c: LrCurve) -> str:
    opt = c.optimum
    return (f"| {c.mode} | {c.scale} | {c.steps if c.steps is not None else '-'} | {c.n_loops} | "
            f"{_mult(c.best)} | {_bpb_at(c, c.best)} | "
            + (f"{_mult(opt[0])} | {opt[1]:.4f} |" if opt else
               f"at the grid's {'lower' if c.best == c.xs[0] else 'upper'} edge | - |"))


def _lr_figures(curves: list[LrCurve], out: Path, cmd: str, mode: str) -> list[str]:
    parts = []
    caption = (cmd + " Mean over seeds, band = min..max over seeds; solid = the longest "
               "horizon, dashed = shorter; star = the parabola's minimum through the three grid "
               "points around the best one (log2 multiplier); dotted = a multiplier whose run "
               "gave no val BPB.")
    for scale in sorted({c.scale for c in curves}):
        name = f"{mode}_{scale}" if mode else scale
        safe = "".join(ch if ch.isalnum() else "_" for ch in name)
        parts.append(_figure_lr([c for c in curves if c.scale == scale],
                                out / f"residual_scaling_{safe}.png",
                                f"Val BPB against the LR multiplier, "
                                f"{mode + ', ' if mode else ''}{scale}, "
                                f"eps = {SCALING_LABELS.get(scale, scale)}", caption))
    return parts


# ---- variable-loop training (issue 14) ------------------------------------------------
LOW_EVAL_LOOPS_BELOW = 6  # "low" evaluation N: below the trained mean of 6; "high": above


def _loop_training(run: dict[str, Any]) -> str:
    sampling = setting(run, "loop_sampling", "fixed")
    label_ = (f"fixed N={setting(run, 'model.n_loops')}" if sampling == "fixed"
              else f"{sampling}")
    k = setting(run, "backprop_loops", 0)
    return label_ + (f", backprop_loops={k}" if k else "")


def _train_cost(run: dict[str, Any]) -> dict[str, float | None]:
    """Tokens/s over the training steps (tokens / summed step time), mean N trained, and
    peak memory, from the run's log and summary."""
    rows = [r for r in run["log"] if "dt" in r and "loss" in r]
    tokens = setting(run, "total_batch_tokens")
    summary = run["summary"] or {}
    peak = summary.get("peak_memory_bytes")
    return {"tokens_per_s": tokens * len(rows) / sum(r["dt"] for r in rows)
            if rows and tokens else None,
            "mean_n": statistics.mean(r["n_loops"] for r in rows)
            if rows and all("n_loops" in r for r in rows) else None,
            "peak_mib": peak / 2**20 if isinstance(peak, int | float) else None}


def _mean_sd(values: list[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def _verdict(name: str, fixed_name: str, by_seed: dict[str, dict[int, dict[Any, float]]],
             loops: list[int], where: str) -> str:
    """One plain sentence: does `name` beat `fixed_name` at these evaluation loops? Also
    the difference paired by seed (same initialisation and data order)."""
    wins, diffs, details = 0, [], []
    for n in loops:
        mine, fixed = by_seed[name].get(n, {}), by_seed[fixed_name].get(n, {})
        a, b = _mean_sd(list(mine.values())), _mean_sd(list(fixed.values()))
        if a is None or b is None:
            continue
        diff = a[0] - b[0]
        # noise: two standard errors of the difference of the seed means
        noise = 2 * math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
        wins += diff < 0
        diffs.append((diff, noise))
        paired = _mean_sd([mine[s] - fixed[s] for s in mine.keys() & fixed.keys()])
        pair_text = (f"; paired by seed {paired[0]:+.4f} ± {paired[1]:.4f} over {paired[2]}"
                     if paired and paired[2] > 1 else "")
        details.append(f"N={n}: {a[0]:.4f} vs {b[0]:.4f} ({diff:+.4f}, noise ±{noise:.4f}"
                       f"{pair_text})")
    if not diffs:
        return f"- {where}: no evaluations to compare."
    clear = sum(d < -e for d, e in diffs)
    worse = sum(d > e for d, e in diffs)
    note = ""
    if clear == len(diffs):
        verdict = "beats"
    elif worse == len(diffs):
        verdict = "loses to"
    elif clear == worse == 0:
        verdict = "does not beat"
        note = ": the difference is within the seed noise at every loop count"
    else:
        verdict = "neither consistently beats nor loses to"
    return (f"- **{where}**: `{name}` {verdict} `{fixed_name}`{note} (lower mean BPB at {wins} of "
            f"{len(diffs)} loop counts; better beyond the seed noise at {clear}, worse beyond "
            f"it at {worse}): " + "; ".join(details) + ".")


def section_variable_loops(runs, out: Path, cmd: str) -> list[str]:
    """Issue 14: validation BPB at every evaluation N, training cost, and a plain verdict on
    variable-N against fixed-N training at low and high evaluation N."""
    groups: dict[str, list] = defaultdict(list)
    for run in runs:
        groups[_loop_training(run)].append(run)
    names = sorted(groups, key=lambda g: (not g.startswith("fixed"), g))
    loops = sorted({n for run in runs for n in eval_loops(run)})
    by_seed = {name: {n: {r["settings"].get("seed", i): eval_metric(r, n, "val_bpb")
                          for i, r in enumerate(members)
                          if eval_metric(r, n, "val_bpb") is not None} for n in loops}
               for name, members in groups.items()}
    table = {name: {n: list(values.values()) for n, values in per_n.items()}
             for name, per_n in by_seed.items()}
    parts = []
    if loops:
        head = ["**Validation bits-per-byte at each evaluation loop count** (mean ± std over "
                "seeds; the budget evaluator, `loopedlm eval --tasks none`)\n",
                "| trained with | seeds | " + " | ".join(f"N={n}" for n in loops) + " |",
                "|---" * (len(loops) + 2) + "|"]
        for name in names:
            head.append(f"| {name} | {len(groups[name])} | " + " | ".join(
                mean_std(table[name][n]) for n in loops) + " |")
        parts.append("\n".join(head) + "\n")
        lines, errors = {}, {}
        for name in names:
            xs = [n for n in loops if _mean_sd(table[name][n])]
            stats = [_mean_sd(table[name][n]) for n in xs]
            lines[name] = (xs, [st[0] for st in stats])
            errors[name] = [st[1] for st in stats]
        parts.append(figure_xy(lines, out / "variable_loops_bpb.png",
                               "Validation BPB against evaluation loops, by how N was trained",
                               "evaluation loops N", "val BPB (mean ± std over seeds)", cmd,
                               errors=errors))
    cost = ["**Training cost** (mean ± std over seeds): tokens/s over the training steps, "
            "the mean loop count actually run, and peak training memory (the summary's "
            "`peak_memory_method`)\n",
            "| trained with | tokens/s | mean N run | peak memory (MiB) | final val BPB |",
            "|---|---|---|---|---|"]
    for name in names:
        costs = [_train_cost(r) for r in groups[name]]
        cost.append(f"| {name} | " + " | ".join(
            _fmt_mean_std([c[key] for c in costs], digits)
            for key, digits in (("tokens_per_s", 0), ("mean_n", 2), ("peak_mib", 1)))
            + f" | {mean_std([val_bpb(r) for r in groups[name]])} |")
    methods = {(r["summary"] or {}).get("peak_memory_method") for r in runs} - {None}
    parts.append("\n".join(cost) + "\n" + (f"\nPeak memory: {', '.join(sorted(methods))}.\n"
                                            if methods else ""))
    fixed = [n for n in names if n.startswith("fixed")]
    if fixed and loops:
        low = [n for n in loops if n < LOW_EVAL_LOOPS_BELOW]
        high = [n for n in loops if n > LOW_EVAL_LOOPS_BELOW]
        lines = ["**Verdict** (computed from the table above; 'noise' is two standard errors "
                 "of the difference of the seed means)\n"]
        for name in names:
            if name in fixed:
                continue
            lines.append(_verdict(name, fixed[0], by_seed, low,
                                  f"low evaluation N ({', '.join(map(str, low))})"))
            lines.append(_verdict(name, fixed[0], by_seed, high,
                                  f"high evaluation N ({', '.join(map(str, high))})"))
        parts.append("\n".join(lines) + "\n")
    return parts


def _fmt_mean_std(values: list[float | None], digits: int) -> str:
    stats = _mean_sd(values)
    if stats is None:
        return "-"
    return f"{stats[0]:.{digits}f}" + (f" ± {stats[1]:.{digits}f}" if stats[2] > 1 else "")


def _by(curves: list[LrCurve]) -> dict[tuple, LrCurve]:
    """Curves of one loop mode by (scaling, horizon, N)."""
    return {(c.scale, c.steps, c.n_loops): c for c in curves}


def _shift(small: LrCurve, large: LrCurve) -> tuple[float, float]:
    """(grid steps, interpolated steps) the optimum moves from `small` to `large` N, in
    factors of 2 of the multiplier (positive: the larger N wants a larger rate)."""
    return large.best - small.best, large.best_x - small.best_x


def _shift_lines(curves: list[LrCurve]) -> list[str]:
    lines = []
    index = _by(curves)
    for scale, steps in sorted({(c.scale, c.steps) for c in curves}, key=lambda k: (k[0], -(k[1] or 0))):
        loops = sorted(n for (s, h, n) in index if s == scale and h == steps)
        for small, large in zip(loops, loops[1:], strict=False):
            a, b = index[(scale, steps, small)], index[(scale, steps, large)]
            grid, interp = _shift(a, b)
            edge = " (a minimum is at the grid's edge, so this is a bound)" if (
                a.at_edge or b.at_edge) else ""
            lines.append(f"{scale}, {steps} steps: N={small} -> N={large}: the grid minimum "
                         f"moves {grid:+.0f} grid steps ({_mult(a.best)} -> {_mult(b.best)}), "
                         f"the interpolated optimum {interp:+.2f} steps "
                         f"({_mult(a.best_x)} -> {_mult(b.best_x)}){edge}.")
    return lines


def claim_sentences(curves: list[LrCurve]) -> list[str]:
    """One sentence per claim of the residual-scaling paper, from the numbers:
    1. a 1/N-type scaling gives a better loss than 1/sqrt(N), at every loop count;
    2. under lambda/(N sqrt(L)) the optimal learning rate does not depend on N (here: its
       interpolated optimum moves by at most half a grid step between the loop counts)."""
    index = _by(curves)
    horizons = sorted({c.steps for c in curves if c.steps is not None}, reverse=True) or [None]
    out = []
    one_over_n = next((s for s in ONE_OVER_N if any(k[0] == s for k in index)), None)
    # claim 1
    if one_over_n and any(k[0] == "inv_sqrt_loops" for k in index):
        verdicts, facts = [], []
        for steps in horizons:
            for n in sorted({k[2] for k in index if k[1] == steps}):
                a, b = index.get((one_over_n, steps, n)), index.get(("inv_sqrt_loops", steps, n))
                if not (a and b):
                    continue
                best_a, best_b = min(a.means), min(b.means)
                noise = max(_noise(a), _noise(b))
                verdicts.append(best_a < best_b - noise if noise else best_a < best_b)
                facts.append(f"N={n}" + (f", {steps} steps" if len(horizons) > 1 else "")
                             + f": {best_a:.4f} vs {best_b:.4f} ({best_a - best_b:+.4f}"
                             + (f", seed std up to {noise:.4f}" if noise else "") + ")")
        if verdicts:
            verdict = ("reproduced" if all(verdicts) else "not reproduced" if not any(verdicts)
                       else "partly reproduced")
            out.append(f"Claim 1 (1/N-type scaling trains better than 1/sqrt(N)): **{verdict}** "
                       f"at this scale. Best val BPB of {one_over_n} vs inv_sqrt_loops, each at "
                       f"its own best multiplier: " + "; ".join(facts) + ". (Better = lower by "
                       "more than the larger seed std at the two best points.)")
    # claim 2
    scale = "lambda_loops_sqrt_depth" if any(k[0] == "lambda_loops_sqrt_depth" for k in index) \
        else one_over_n
    if scale:
        verdicts, facts, also = [], [], set()
        for steps in horizons:
            loops = sorted(k[2] for k in index if k[0] == scale and k[1] == steps)
            if len(loops) < 2:
                continue
            a, b = index[(scale, steps, loops[0])], index[(scale, steps, loops[-1])]
            grid, interp = _shift(a, b)
            others = []
            for other in sorted({k[0] for k in index} - {scale}):
                oa, ob = index.get((other, steps, loops[0])), index.get((other, steps, loops[-1]))
                if oa and ob:
                    moved = _shift(oa, ob)[1]
                    others.append(f"{other} {moved:+.2f}")
                    if abs(moved) <= 0.5 and not (oa.at_edge or ob.at_edge):
                        also.add(other)
            exact = not (a.at_edge or b.at_edge)
            verdicts.append(exact and abs(interp) <= 0.5)
            facts.append((f"{steps} steps: " if len(horizons) > 1 else "")
                         + f"N={loops[0]} -> N={loops[-1]} moves the grid minimum {grid:+.0f} "
                         f"and the interpolated optimum {interp:+.2f} grid steps"
                         + ("" if exact else " (a minimum at the grid's edge)")
                         + (f" (other scalings: {', '.join(others)})" if others else ""))
        if verdicts:
            verdict = ("reproduced" if all(verdicts) else "not reproduced" if not any(verdicts)
                       else "partly reproduced")
            out.append(f"Claim 2 (with {scale} the best learning rate does not depend on N): "
                       f"**{verdict}** at this scale (criterion: the interpolated optimum moves "
                       f"by at most half a grid step, a factor of 1.41). " + "; ".join(facts)
                       + "." + (f" The criterion also holds for {', '.join(sorted(also))} at some "
                                "horizon, so there the transfer is not specific to the 1/N "
                                "scaling." if also else ""))
    # stability of the ordering across horizons
    if len(horizons) > 1:
        orders = {}
        for steps in horizons:
            for n in sorted({k[2] for k in index}):
                ranked = sorted((min(c.means), c.scale) for k, c in index.items()
                                if k[1] == steps and k[2] == n)
                if len(ranked) > 1:
                    orders.setdefault(n, {})[steps] = [s for _, s in ranked]
        same = [n for n, by_h in orders.items() if len(by_h) == len(horizons)
                and len({tuple(v) for v in by_h.values()}) == 1]
        differ = [n for n, by_h in orders.items() if len(by_h) == len(horizons) and n not in same]
        if same or differ:
            desc = "; ".join(f"N={n}: " + " / ".join(
                f"{h} steps: {' < '.join(orders[n][h])}" for h in horizons)
                for n in sorted(same + differ))
            out.append("Ordering of the scalings at their optima (best first) "
                       + ("is the same at every horizon" if not differ else
                          f"changes with the horizon at N={', '.join(map(str, differ))}")
                       + f": {desc}.")
    return out


SECTIONS = {"loop_scaling": section_loop_scaling, "stability": section_stability,
            "attention": section_attention, "test_time": section_test_time,
            "residual_scaling": section_residual_scaling,
            "variable_loops": section_variable_loops}


def write_report(sweep_dir: str | Path) -> Path:
    """Write SWEEP_DIR/report.md and its figures; returns the report's path."""
    sweep_dir = Path(sweep_dir)
    manifest, runs = load_runs(sweep_dir)
    experiment = manifest.get("experiment", "custom")
    cmd = (f"Made by `{manifest.get('command', 'loopedlm sweep')}` then "
           f"`loopedlm report {sweep_dir}`.")
    parts = [f"# Sweep report: {sweep_dir.name} ({experiment})\n"]
    if manifest.get("description"):
        parts.append(manifest["description"].strip() + "\n")
    done = [r for r in runs if r["summary"]]
    parts.append(f"{len(done)} of {len(runs)} runs have a summary. {cmd}\n")
    if experiment in SECTIONS and done:
        parts += SECTIONS[experiment](done, sweep_dir, cmd)
    parts.append("## All runs\n\n" + runs_table(runs))
    report = sweep_dir / "report.md"
    report.write_text("\n".join(parts))
    return report


def _cmd_report(args: argparse.Namespace) -> int:
    for folder in args.sweep_dirs:
        print(f"wrote {write_report(folder)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables and figures of finished sweeps")
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR")
    p.set_defaults(func=_cmd_report)
