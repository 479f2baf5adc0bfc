"""The residual-scaling paper's measurement (docs/design.md#residual-scaling): val BPB
against the learning-rate multiplier, one curve per (loop mode, residual scaling, horizon,
N), over seeds, with the optimum interpolated between grid points."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from loopedlm.experiments.report.runs import setting, val_bpb

ONE_OVER_N = ("lambda_loops_sqrt_depth", "inv_loops")  # the paper's 1/N-type scalings


def parabola_minimum(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """The vertex (x, y) of the parabola through the grid minimum and its two neighbours,
    or None when the minimum lies on the edge of the grid (or the three are not convex). A
    minimum shared by an edge point and its neighbour is taken at the neighbour: the vertex
    then lies between them, inside the grid."""
    last = len(ys) - 1
    i = min(range(len(ys)), key=lambda j: (ys[j], j in (0, last)))
    if i == 0 or i == last:
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
    """The runs' curves (those with at least one val BPB), sorted by mode, scaling, longest
    horizon first, then N."""
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


def curves_by_key(curves: list[LrCurve]) -> dict[tuple, LrCurve]:
    """Curves of one loop mode by (scaling, horizon, N)."""
    return {(c.scale, c.steps, c.n_loops): c for c in curves}


def optimum_shift(small: LrCurve, large: LrCurve) -> tuple[float, float]:
    """(grid steps, interpolated steps) the optimum moves from `small` to `large` N, in
    factors of 2 of the multiplier (positive: the larger N wants a larger rate)."""
    return large.best - small.best, large.best_x - small.best_x


def seed_noise(curve: LrCurve) -> float:
    """The standard deviation over seeds at the curve's best grid point (0 for one seed)."""
    vals = curve.seeds_at(curve.best)
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def format_multiplier(x: float) -> str:
    """A log2 multiplier as a readable factor: 1/8x, 1x, 2.83x."""
    value = 2.0 ** x
    if abs(x - round(x)) < 1e-9:
        return f"{value:g}x" if x >= 0 else f"1/{2.0 ** -x:g}x"
    return f"{value:.3g}x"
