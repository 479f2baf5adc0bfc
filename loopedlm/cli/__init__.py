"""The `loopedlm` command: argument parsing only. Each module of this package registers
its sub-commands, which call library functions."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loopedlm.cli.exit_codes import error_exit

# module -> it defines `register(subparsers)`, adding its sub-commands with `func=` set
COMMAND_MODULES = [
    "loopedlm.cli.data",
    "loopedlm.cli.tokenizer",
    "loopedlm.cli.train",
    "loopedlm.cli.plot",
    "loopedlm.cli.eval",
    "loopedlm.cli.sample",
    "loopedlm.cli.sweep",
    "loopedlm.cli.report",
    "loopedlm.cli.info",
    "loopedlm.cli.serve",
    "loopedlm.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loopedlm",
        description="Train, evaluate and serve looped transformer language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # feature not in this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyboardInterrupt) as exc:
        # bad input, an unusable path, Ctrl-C: one clear line, not a traceback (use -v for
        # the traceback), and a documented exit code
        if args.verbose and not isinstance(exc, KeyboardInterrupt):
            raise
        code, line = error_exit(exc)
        print(f"loopedlm {args.command}: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
