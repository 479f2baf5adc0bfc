"""`loopedlm train`: the paper's training recipe with live diagnostics,
atomic checkpoints, exact resume, and torchrun/DDP.

Configuration is three sections, each a validated dataclass:
  top level  `TrainConfig`           --steps=200          TOML: steps = 200
  [model]    `ModelConfig` overrides --model.n_loops=6    TOML: [model] n_loops = 6
  [optim]    `OptimConfig`           --optim.lr_scale=2   TOML: [optim] lr_scale = 2.0
  [collapse] `CollapseThresholds`    --collapse.spike_ratio=1
`--n-loops N` (the loop count's spelling on every command) is `--model.n_loops=N`.
A recipe (`recipes/NAME.toml` or a path) is read first, then `--key=value` overrides.
The model starts from `preset` and the [model] section overrides its fields.

    loopedlm train                         # recipes/tiny.toml on the bundled corpus
    loopedlm train small --steps=1000      # recipes/small.toml
    loopedlm train --n-loops 6             # the tiny recipe at N=6
    torchrun --nproc_per_node=8 -m loopedlm.train base
    loopedlm train --run_dir=runs/x --resume
    loopedlm train small --print-config    # the resolved settings, without running
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from loopedlm.cli import HELP_FLAGS, add_command
from loopedlm.cli.exit_codes import error_exit
from loopedlm.common.overrides import BOOL_SPELLINGS

if TYPE_CHECKING:
    from loopedlm.train.config import TrainConfig


def settings_help(cfg: TrainConfig | None = None, source: str = "") -> str:
    """Every setting with its value in `cfg` (default: the built-in defaults) as
    `--key=value` lines."""
    from loopedlm.train.config import TrainConfig

    cfg = cfg or TrainConfig()
    lines = [f"settings ({source or 'built-in defaults'}):"]
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "optim", "collapse"):
            continue
        lines.append(f"  --{f.name}={getattr(cfg, f.name)!r}")
    for section in ("optim", "collapse"):
        part = getattr(cfg, section)
        lines += [f"  --{section}.{f.name}={getattr(part, f.name)!r}"
                  for f in dataclasses.fields(part)]
    try:
        model = cfg.model_config().to_dict()
    except (ValueError, TypeError):
        model = {}
    lines += [f"  --model.{k}={v!r}" for k, v in model.items()]
    lines.append("  (--model.vocab_size follows the tokenizer unless set; booleans take "
                 f"true/false, {BOOL_SPELLINGS})")
    return "\n".join(lines)


PRINT_CONFIG_FLAGS = ("--print-config", "--print_config", "--dry-run", "--dry_run")


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """What a run of `cfg` will use: the train settings and the model (its preset with the
    [model] overrides; vocab_size follows the tokenizer unless set)."""
    return {"train": cfg.to_dict(), "model": cfg.model_config().to_dict()}


def run_cli(args: list[str]) -> int:
    """Parse `[RECIPE] --key=value ...`, train, print the final BPB and a sample.

    Exit codes: 0 done (or stopped by SIGTERM or Ctrl-C after saving), 2 bad input, 3
    collapsed (non-finite loss), 4 out of memory, 5 a checkpoint could not be written, 130 a
    second Ctrl-C (stopped at once) (loopedlm.cli.exit_codes)."""
    from loopedlm.train.config import build_config, parse_train_args
    from loopedlm.train.trainer import FAILURE_EXIT_CODES, TrainingCollapsed, train

    settings = [a for a in args if a not in HELP_FLAGS + PRINT_CONFIG_FLAGS]
    if any(a in HELP_FLAGS for a in args):
        print(__doc__)
        recipe, overrides = parse_train_args(settings)
        try:
            print(settings_help(build_config(recipe, overrides),
                                f"recipe {recipe or 'tiny'}" + (" + your overrides"
                                                                if overrides else "")))
        except (ValueError, FileNotFoundError) as exc:
            print(f"({exc}; showing the built-in defaults)\n{settings_help()}")
        return 0
    recipe, overrides = parse_train_args(settings)
    cfg = build_config(recipe, overrides)
    if len(settings) < len(args):  # --print-config / --dry-run
        print(json.dumps(resolved_config(cfg), indent=2))
        return 0
    try:
        summary = train(cfg)
    except tuple(FAILURE_EXIT_CODES) as exc:
        prefix = "training collapsed" if isinstance(exc, TrainingCollapsed) else \
            "loopedlm train: error"
        print(f"{prefix}: {exc}", file=sys.stderr)
        return FAILURE_EXIT_CODES[type(exc)]
    if int(os.environ.get("RANK", "0")) == 0:
        minutes = summary["wall_time_s"] / 60
        print(f"run folder: {summary['run_dir']}")
        print(f"steps: {summary['step']}  wall time: {minutes:.1f} min  "
              f"collapse check: {summary['collapse']['status']}")
        if summary["status"] == "interrupted":
            print(summary["message"])
            return 0
        print(f"final validation bits-per-byte: {summary['val_bpb']:.4f}")
        print(f"sample: {summary.get('sample', '')!r}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return run_cli(args.settings)


def register(subparsers) -> None:
    # '+' as the option prefix: every `--key=value` reaches `settings` untouched (argparse
    # would reject them as unknown options); -h/--help is handled by run_cli.
    parser = add_command(
        subparsers, "train",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        prefix_chars="+", add_help=False)
    parser.add_argument("settings", nargs="*",
                        help="[RECIPE] [--n-loops N] [--key=value ...] "
                             "[--model.KEY=VALUE ...] [--optim.KEY=VALUE ...]")
    parser.set_defaults(func=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run_cli(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError, KeyboardInterrupt) as exc:
        code, line = error_exit(exc)
        print(f"loopedlm train: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
