"""`--key=value` settings after a command's positional arguments (`loopedlm info PRESET
--n_loops=6`, `loopedlm sweep SWEEP --steps=2`), next to the command's own options.

argparse rejects options it does not know, so the settings are collected as a trailing
REMAINDER and the command's own options among them are parsed once more; what is left is
for loopedlm.common.overrides. (`loopedlm train` takes settings only: see cli/train.py.)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

HELP_FLAGS = ("-h", "--help")


class TrailingSettings:
    """The options `add_options` adds, and `--KEY=VALUE ...` after the positionals."""

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
