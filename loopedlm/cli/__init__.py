"""The `loopedlm` command. Each feature module registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> it defines `register(subparsers)`, adding its sub-commands with `func=` set
COMMAND_MODULES = [
    "loopedlm.data.loader",
    "loopedlm.data.tokenizer",
    "loopedlm.train.trainer",
    "loopedlm.experiments.plot",
    "loopedlm.evaluate.cli",
    "loopedlm.infer.generate",
    "loopedlm.experiments.sweep",
    "loopedlm.experiments.info",
    "loopedlm.infer.command",
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
    except (ValueError, FileNotFoundError) as exc:
        # bad input: one clear line, not a traceback (use -v for the traceback)
        if args.verbose:
            raise
        print(f"loopedlm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
