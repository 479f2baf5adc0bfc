"""`loopedlm sweep` (a grid of training runs) and `loopedlm report` (the paper's tables and
figures from finished sweeps)."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from loopedlm.cli import TrailingSettings, add_command


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="sweep folder (default sweeps/<file stem>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and commands only")
    parser.add_argument("--only", default=None,
                        help="run only runs whose name contains this text")
    parser.add_argument("--in-process", action="store_true",
                        help="train in this process (no per-run start-up; for many tiny runs)")


def _cmd_sweep(trailing: TrailingSettings, args: argparse.Namespace) -> int:
    settings = trailing.parse(args)
    if settings is None:
        return 0
    from loopedlm.experiments.sweep import Sweep, run_sweep, train_overrides

    sweep = Sweep.load(args.sweep)
    sweep.overrides = train_overrides(settings)
    out = Path(args.out or Path("sweeps") / sweep.path.stem)
    rows = run_sweep(sweep, out, dry_run=args.dry_run, only=args.only,
                     in_process=args.in_process)
    for row in rows:
        print(f"{row['status']:<22} {row.get('eval_status', ''):<14} {row['name']}")
        if args.dry_run:
            print("    " + " ".join(row["train_cmd"][1:]))
    failed = [r for r in rows if "failed" in r["status"] or "failed" in r.get("eval_status", "")]
    print(f"{len(rows)} runs, {len(failed)} failed; results in {out}")
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from loopedlm.experiments.report.write import write_report

    for folder in args.sweep_dirs:
        print(f"wrote {write_report(folder)}")
    return 0


SWEEP_DESCRIPTION = """`loopedlm sweep`: a grid of training runs (the sweep file's format and the
order of its settings: loopedlm.experiments.sweep).

    loopedlm sweep recipes/sweeps/stability_tiny.toml --out sweeps/stability_tiny
    loopedlm sweep loop_scaling_tiny --dry-run                # the runs and their commands
    loopedlm sweep loop_scaling_tiny --out /tmp/smoke --steps=2 --eval_tokens=1024
                                                              # every run, 2 steps: a smoke test
"""


def register(subparsers) -> None:
    """Add `loopedlm sweep` and `loopedlm report`."""
    p = add_command(subparsers, "sweep", description=SWEEP_DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweep TOML file, or a name under recipes/sweeps/")
    trailing = TrailingSettings(p, _add_options,
                                help="train settings for every run (the syntax of `loopedlm "
                                     "train`, --n-loops N included): above the sweep's [train], "
                                     "below its grid and runs")
    p.set_defaults(func=partial(_cmd_sweep, trailing))
    p = add_command(subparsers, "report")
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR")
    p.set_defaults(func=_cmd_report)

