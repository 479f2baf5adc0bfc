"""`loopedlm plot RUN... [--out DIR]`: the paper's diagnostic figures (section 3) from
runs' `log.jsonl`, several runs overlaid: training loss (and validation bits-per-byte),
the residual-state norm of each loop, and the gradient norms, against step. Every step
the collapse detector flags is marked on every figure (a dotted line in the run's colour,
labelled with the rule), and listed on the console."""

from __future__ import annotations

import argparse
from pathlib import Path

from loopedlm.cli import add_command


def _cmd_plot(args: argparse.Namespace) -> int:
    from loopedlm.experiments.plot import collapse_events, plot_runs

    first = Path(args.runs[0])
    out = args.out or ((first if first.is_dir() else first.parent) / "plots")
    for path in plot_runs(args.runs, out):
        print(path)
    for run in args.runs:
        for event in collapse_events(run):
            print(f"{run}: collapse flag '{event['kind']}' at step {event['step']}: "
                  f"{event['detail']}")
    return 0


def register(subparsers) -> None:
    parser = add_command(subparsers, "plot", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (each with a log.jsonl)")
    parser.add_argument("--out", help="output folder (default: FIRST_RUN/plots)")
    parser.set_defaults(func=_cmd_plot)
