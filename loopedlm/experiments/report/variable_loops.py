"""Variable-loop training (issue 14): validation BPB at every evaluation N, training cost,
and a plain verdict on variable-N against fixed-N training at low and high evaluation N."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from loopedlm.experiments.report.figures import figure_xy
from loopedlm.experiments.report.runs import eval_loops, eval_metric, setting, val_bpb
from loopedlm.experiments.report.tables import mean_std

LOW_EVAL_LOOPS_BELOW = 6  # "low" evaluation N: below the trained mean of 6; "high": above

# training name -> evaluation N -> seed -> val BPB
BpbBySeed = dict[str, dict[int, dict[Any, float]]]


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
    parts = []
    if loops:
        parts += [_bpb_table(names, groups, by_seed, loops),
                  _bpb_figure(names, by_seed, loops, out, cmd)]
    parts.append(_cost_table(names, groups, runs))
    fixed = [n for n in names if n.startswith("fixed")]
    if fixed and loops:
        parts.append(_verdicts([n for n in names if n not in fixed], fixed[0], by_seed, loops))
    return parts


def _loop_training(run: dict[str, Any]) -> str:
    sampling = setting(run, "loop_sampling", "fixed")
    label_ = (f"fixed N={setting(run, 'model.n_loops')}" if sampling == "fixed"
              else f"{sampling}")
    k = setting(run, "backprop_loops", 0)
    return label_ + (f", backprop_loops={k}" if k else "")


def _bpb_table(names: list[str], groups: dict[str, list], by_seed: BpbBySeed,
               loops: list[int]) -> str:
    head = ["**Validation bits-per-byte at each evaluation loop count** (mean ± std over "
            "seeds; the budget evaluator, `loopedlm eval --tasks none`)\n",
            "| trained with | seeds | " + " | ".join(f"N={n}" for n in loops) + " |",
            "|---" * (len(loops) + 2) + "|"]
    for name in names:
        head.append(f"| {name} | {len(groups[name])} | " + " | ".join(
            mean_std(list(by_seed[name][n].values())) for n in loops) + " |")
    return "\n".join(head) + "\n"


def _bpb_figure(names: list[str], by_seed: BpbBySeed, loops: list[int], out: Path,
                cmd: str) -> str:
    lines, errors = {}, {}
    for name in names:
        xs = [n for n in loops if _mean_sd(list(by_seed[name][n].values()))]
        stats = [_mean_sd(list(by_seed[name][n].values())) for n in xs]
        lines[name] = (xs, [st[0] for st in stats])
        errors[name] = [st[1] for st in stats]
    return figure_xy(lines, out / "variable_loops_bpb.png",
                     "Validation BPB against evaluation loops, by how N was trained",
                     "evaluation loops N", "val BPB (mean ± std over seeds)", cmd,
                     errors=errors)


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


def _cost_table(names: list[str], groups: dict[str, list], runs: list[dict[str, Any]]) -> str:
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
    return "\n".join(cost) + "\n" + (f"\nPeak memory: {', '.join(sorted(methods))}.\n"
                                     if methods else "")


def _mean_sd(values: list[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def _fmt_mean_std(values: list[float | None], digits: int) -> str:
    stats = _mean_sd(values)
    if stats is None:
        return "-"
    return f"{stats[0]:.{digits}f}" + (f" ± {stats[1]:.{digits}f}" if stats[2] > 1 else "")


def _verdicts(variable: list[str], fixed_name: str, by_seed: BpbBySeed,
              loops: list[int]) -> str:
    """Each variable-N training against `fixed_name`, at low and at high evaluation N."""
    low = [n for n in loops if n < LOW_EVAL_LOOPS_BELOW]
    high = [n for n in loops if n > LOW_EVAL_LOOPS_BELOW]
    lines = ["**Verdict** (computed from the table above; 'noise' is two standard errors "
             "of the difference of the seed means)\n"]
    for name in variable:
        lines.append(_verdict(name, fixed_name, by_seed, low,
                              f"low evaluation N ({', '.join(map(str, low))})"))
        lines.append(_verdict(name, fixed_name, by_seed, high,
                              f"high evaluation N ({', '.join(map(str, high))})"))
    return "\n".join(lines) + "\n"


def _compare_at(mine: dict[Any, float], fixed: dict[Any, float], n: int
                ) -> tuple[float, float, str] | None:
    """(difference of the seed means, its noise, the detail text) at evaluation N=n, or
    None when either side has no value."""
    a, b = _mean_sd(list(mine.values())), _mean_sd(list(fixed.values()))
    if a is None or b is None:
        return None
    diff = a[0] - b[0]
    # noise: two standard errors of the difference of the seed means
    noise = 2 * math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    paired = _mean_sd([mine[s] - fixed[s] for s in mine.keys() & fixed.keys()])
    pair_text = (f"; paired by seed {paired[0]:+.4f} ± {paired[1]:.4f} over {paired[2]}"
                 if paired and paired[2] > 1 else "")
    return diff, noise, (f"N={n}: {a[0]:.4f} vs {b[0]:.4f} ({diff:+.4f}, noise ±{noise:.4f}"
                         f"{pair_text})")


def _verdict(name: str, fixed_name: str, by_seed: BpbBySeed, loops: list[int],
             where: str) -> str:
    """One plain sentence: does `name` beat `fixed_name` at these evaluation loops? Also
    the difference paired by seed (same initialisation and data order)."""
    compared = [_compare_at(by_seed[name].get(n, {}), by_seed[fixed_name].get(n, {}), n)
                for n in loops]
    compared = [c for c in compared if c is not None]
    if not compared:
        return f"- {where}: no evaluations to compare."
    wins = sum(diff < 0 for diff, _, _ in compared)
    clear = sum(diff < -noise for diff, noise, _ in compared)
    worse = sum(diff > noise for diff, noise, _ in compared)
    note = ""
    if clear == len(compared):
        verdict = "beats"
    elif worse == len(compared):
        verdict = "loses to"
    elif clear == worse == 0:
        verdict = "does not beat"
        note = ": the difference is within the seed noise at every loop count"
    else:
        verdict = "neither consistently beats nor loses to"
    return (f"- **{where}**: `{name}` {verdict} `{fixed_name}`{note} (lower mean BPB at {wins} of "
            f"{len(compared)} loop counts; better beyond the seed noise at {clear}, worse beyond "
            f"it at {worse}): " + "; ".join(detail for _, _, detail in compared) + ".")
