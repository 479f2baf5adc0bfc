"""The `loopedlm` command: argument parsing only. Each module of this package registers
its sub-commands, which call library functions.

Only the module of the command being run is imported (the others appear in `loopedlm
--help` through their line in COMMANDS), and each module imports the heavy libraries
(torch above all) inside the functions that need them, so that `--help` and the commands
that need no model start at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from loopedlm.cli.exit_codes import error_exit

# command -> (the module whose `register(subparsers)` adds it with `func=` set, its line in
# `loopedlm --help`); a module that registers several commands is imported once for any
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("loopedlm.cli.data", "prepare training corpora"),
    "tokenizer": ("loopedlm.cli.tokenizer", "train or inspect tokenizers"),
    "train": ("loopedlm.cli.train", "train a looped model (recipe + --key=value overrides)"),
    "plot": ("loopedlm.cli.plot", "draw loss / residual-norm / grad-norm figures"),
    "eval": ("loopedlm.cli.eval", "evaluate a run at several loop counts"),
    "eval-tasks": ("loopedlm.cli.eval", "fetch or list the evaluation tasks available offline"),
    "lm-eval": ("loopedlm.cli.eval",
                "run EleutherAI lm-evaluation-harness with the 'loopedlm' model registered"),
    "sample": ("loopedlm.cli.sample", "generate text from a trained run"),
    "sweep": ("loopedlm.cli.sweep", "run a grid of training runs (resumable)"),
    "report": ("loopedlm.cli.sweep", "tables and figures of finished sweeps"),
    "info": ("loopedlm.cli.info", "sizes and FLOPs of a preset or a run"),
    "import-nanochat": ("loopedlm.cli.info", "convert an FLT-authors (nanochat fork) checkpoint"),
    "serve": ("loopedlm.cli.serve", "serve a run over an OpenAI-compatible HTTP API"),
    "export": ("loopedlm.cli.export", "write a run as a Hugging Face folder (transformers, lm-eval)"),
    "import-hf": ("loopedlm.cli.import_hf",
                  "run or import a public looped model's Hugging Face folder (Ouro, Huginn)"),
}


def add_command(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add the parser of command `name` (its help line from COMMANDS)."""
    return subparsers.add_parser(name, help=COMMANDS[name][1], **kwargs)


def decoding_device(device: str | None) -> str:
    """The device `sample` and `serve` decode on (default: cuda if there is one), and on a CPU
    one torch thread unless OMP_NUM_THREADS says otherwise: a decode step's small matrix
    products gain nothing from more threads, which only wait on each other (and badly on a
    busy machine). Training and evaluation keep torch's default: every core."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    return device


class DeprecatedSpelling(argparse.Action):
    """An old spelling of an option, kept for one release: it stores its value where the new
    spelling does and prints one line on stderr naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated and goes in the next "
              f"release: use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_spelling(parser: argparse.ArgumentParser, old: str,
                            new: argparse.Action) -> None:
    """Accept `old` as a hidden spelling of the option `new` (the action `add_argument`
    returned), with a deprecation line when used."""
    parser.add_argument(old, dest=new.dest, type=new.type, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, action=DeprecatedSpelling,
                        new=new.option_strings[0])


HELP_FLAGS = ("-h", "--help")


class TrailingSettings:
    """`--key=value` settings after a command's positional arguments (`loopedlm info PRESET
    --n-loops 6 --loop_mode=lt`, `loopedlm sweep SWEEP --steps=2`), next to the command's own
    options (`add_options` adds them).

    argparse rejects options it does not know, so the settings are collected as a trailing
    REMAINDER and the command's own options among them are parsed once more; what is left is
    for loopedlm.common.overrides. (`loopedlm train` takes settings only: see cli/train.py.)
    """

    def __init__(self, parser: argparse.ArgumentParser,
                 add_options: Callable[[argparse.ArgumentParser], None], help: str):
        self.parser = parser
        add_options(parser)
        parser.add_argument("settings", nargs=argparse.REMAINDER, metavar="--KEY=VALUE",
                            help=help)
        self.options = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        add_options(self.options)

    def parse(self, args: argparse.Namespace) -> list[str] | None:
        """The settings, with `args` updated by the options found among them; None (after
        printing the help) when they ask for help."""
        if any(a in HELP_FLAGS for a in args.settings):
            self.parser.print_help()
            return None
        _, settings = self.options.parse_known_args(args.settings, namespace=args)
        return settings


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `loopedlm` parser. The module of `command` (of every command for "all") registers
    its full parsers; every other command is a placeholder with its help line, which is all
    that `loopedlm --help` and argparse's choices need."""
    parser = argparse.ArgumentParser(
        prog="loopedlm",
        description="Train, evaluate and serve looped transformer language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command == "all":
        modules = {module for module, _ in COMMANDS.values()}
    else:
        modules = {COMMANDS[command][0]} if command in COMMANDS else set()
    for name, (module_name, help_line) in COMMANDS.items():
        if name in subparsers.choices:  # registered with another command of its module
            continue
        if module_name in modules and _register(module_name, subparsers):
            continue
        subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def _register(module_name: str, subparsers: Any) -> bool:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # feature not in this build
            return False
        raise
    module.register(subparsers)
    return True


def command_of(argv: list[str]) -> str | None:
    """The command named in `argv`: its first word that is not an option (the `loopedlm`
    options before it take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
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
