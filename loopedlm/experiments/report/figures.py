"""The report's PNG figures: training curves over steps, and lines of (x, y) points.
Each returns its Markdown (the figure and its caption)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from loopedlm.experiments.report.runs import label, seed_groups


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(fig, ax, path: Path, title: str, caption: str) -> str:
    """Grid, legend and title; save `path` and return its Markdown (figure + caption)."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return _save(fig, path, title, caption)


def _save(fig, path: Path, title: str, caption: str) -> str:
    """Save the figure to `path`, close it, and return its Markdown (figure + caption)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"![{title}]({path.name})\n\n*{title}.* {caption}\n"


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


def _plot_seed_band(ax, members: list[dict[str, Any]], keys: list[str], key: str,
                    index: int | None) -> None:
    """The mean over seeds of one group as a line, with its min..max band."""
    curves = [_series(r, key, index) for r in members]
    curves = [c for c in curves if c[0]]
    if not curves:
        return
    length = min(len(c[0]) for c in curves)
    steps = curves[0][0][:length]
    stack = [[c[1][i] for c in curves] for i in range(length)]
    finite = [[v for v in col if math.isfinite(v)] or [float("nan")] for col in stack]
    mean = [statistics.mean(col) for col in finite]
    line, = ax.plot(steps, mean, label=label(members[0], keys) or members[0]["name"])
    if len(curves) > 1:
        ax.fill_between(steps, [min(c) for c in finite], [max(c) for c in finite],
                        color=line.get_color(), alpha=0.2)


def figure_curves(runs, keys, path: Path, title: str, caption: str,
                  panels: list[tuple[str, str, int | None, bool]]) -> str:
    """One panel per (log key, y label, loop index, log-scale); one line per group of seeds
    (mean), with the min..max band over seeds."""
    plt = pyplot()
    groups = seed_groups(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (key, ylabel, index, log_y) in zip(axes[0], panels, strict=True):
        for members in groups.values():
            _plot_seed_band(ax, members, keys, key, index)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, title, caption)


def figure_xy(lines: dict[str, tuple[list[float], list[float]]], path: Path, title: str,
              xlabel: str, ylabel: str, caption: str, log_x: bool = False,
              errors: dict[str, list[float]] | None = None,
              ylim: tuple[float, float] | None = None,
              baseline: tuple[str, float] | None = None) -> str:
    """One line per name (optionally with error bars `errors[name]`); `ylim` fixes the y
    range, `baseline` (label, y) draws a dotted horizontal line (a guessing score)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in lines.items():
        ax.errorbar(xs, ys, yerr=(errors or {}).get(name), marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    if baseline is not None:
        ax.axhline(baseline[1], linestyle=":", color="grey", label=baseline[0])
    if ylim is not None:
        ax.set_ylim(*ylim)
    return finish_figure(fig, ax, path, title, caption)
