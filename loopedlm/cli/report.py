"""`loopedlm report`: the paper's tables and figures from a sweep."""

from __future__ import annotations

import argparse

from loopedlm.cli import add_command


def _cmd_report(args: argparse.Namespace) -> int:
    from loopedlm.experiments.report.write import write_report

    for folder in args.sweep_dirs:
        print(f"wrote {write_report(folder)}")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "report")
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR")
    p.set_defaults(func=_cmd_report)
