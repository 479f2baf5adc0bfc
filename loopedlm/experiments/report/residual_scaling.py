"""The residual-scaling paper's section (docs/design.md#residual-scaling): the best
learning-rate multiplier per residual scaling, loop count and horizon; whether it moves
with N; the paper's claims; and one figure of val BPB against the multiplier per scaling."""

from __future__ import annotations

import statistics
from pathlib import Path

from loopedlm.experiments.report.claims import claim_sentences
from loopedlm.experiments.report.figures import finish_figure, pyplot
from loopedlm.experiments.report.lr_curves import (
    LrCurve,
    curves_by_key,
    format_multiplier,
    lr_curves,
    optimum_shift,
)

SCALING_LABELS = {"none": "1", "inv_sqrt_loops": "1/sqrt N", "inv_loops": "1/N",
                  "lambda_loops_sqrt_depth": "lambda/N sqrt L"}  # no parentheses: figure titles


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


def _bpb_at(curve: LrCurve, x: float) -> str:
    vals = curve.seeds_at(x)
    return f"{statistics.mean(vals):.4f}" + (f" ± {statistics.stdev(vals):.4f}"
                                              if len(vals) > 1 else "") + f" (n={len(vals)})"


def _table_row(c: LrCurve) -> str:
    opt = c.optimum
    return (f"| {c.mode} | {c.scale} | {c.steps if c.steps is not None else '-'} | {c.n_loops} | "
            f"{format_multiplier(c.best)} | {_bpb_at(c, c.best)} | "
            + (f"{format_multiplier(opt[0])} | {opt[1]:.4f} |" if opt else
               f"at the grid's {'lower' if c.best == c.xs[0] else 'upper'} edge | - |"))


def _shift_lines(curves: list[LrCurve]) -> list[str]:
    """How far the optimum moves between consecutive loop counts, per scaling and horizon."""
    lines = []
    index = curves_by_key(curves)
    for scale, steps in sorted({(c.scale, c.steps) for c in curves}, key=lambda k: (k[0], -(k[1] or 0))):
        loops = sorted(n for (s, h, n) in index if s == scale and h == steps)
        for small, large in zip(loops, loops[1:], strict=False):
            a, b = index[(scale, steps, small)], index[(scale, steps, large)]
            grid, interp = optimum_shift(a, b)
            edge = " (a minimum is at the grid's edge, so this is a bound)" if (
                a.at_edge or b.at_edge) else ""
            lines.append(f"{scale}, {steps} steps: N={small} -> N={large}: the grid minimum "
                         f"moves {grid:+.0f} grid steps ({format_multiplier(a.best)} -> "
                         f"{format_multiplier(b.best)}), the interpolated optimum {interp:+.2f} "
                         f"steps ({format_multiplier(a.best_x)} -> "
                         f"{format_multiplier(b.best_x)}){edge}.")
    return lines


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


def _figure_lr(curves: list[LrCurve], path: Path, title: str, caption: str) -> str:
    plt = pyplot()
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
    return finish_figure(fig, ax, path, title, caption)
