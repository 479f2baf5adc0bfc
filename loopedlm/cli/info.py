"""`loopedlm info` (what a preset or run is: sizes, FLOPs per loop) and
`loopedlm import-nanochat` (convert an FLT-authors checkpoint into a loopedlm model folder).

    loopedlm info small                            # a preset
    loopedlm info tiny --n-loops 6 --loop_mode=lt  # with ModelConfig fields changed
    loopedlm info runs/x --json                    # a run or checkpoint folder, as JSON
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from loopedlm.cli import TrailingSettings, add_command
from loopedlm.model.config import PRESETS


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override ModelConfig fields of a preset or run, e.g. --set loop_mode=lt "
                             "n_loops=6 (the older spelling of --KEY=VALUE)")
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts) instead "
                                                            "of a table")


def _cmd_info(trailing: TrailingSettings, args: argparse.Namespace) -> int:
    settings = trailing.parse(args)
    if settings is None:
        return 0
    from loopedlm.experiments.info import describe, format_table, preset_overrides, target_config

    config = target_config(args.target, preset_overrides(settings, args.set))
    info = describe(config)
    print(json.dumps(info, indent=2) if args.json else format_table(args.target, info))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from loopedlm.data.tokenizer import nanochat_tokenizer
    from loopedlm.model.checkpoint import save_model
    from loopedlm.model.interop import import_nanochat_checkpoint

    model, meta = import_nanochat_checkpoint(args.source, step=args.step)
    out = save_model(args.out, model, {"imported_from": str(Path(args.source).resolve()),
                                       "nanochat_meta": meta})
    print(f"wrote {out} ({model.config.loop_mode}, {model.num_params():,} parameters)")
    tokenizer = nanochat_tokenizer(model.config)
    if tokenizer is not None:  # eval and sample then use their BOS, <|im_start|>
        print(f"wrote {tokenizer.save(out / 'tokenizer')} ({tokenizer.name}, BOS id "
              f"{tokenizer.bos_id})")
    else:
        print(f"no tokenizer saved: vocab_size={model.config.vocab_size} is not Qwen3's; pass "
              f"--tokenizer to eval and sample")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "info", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a run/checkpoint folder")
    trailing = TrailingSettings(p, _add_options,
                                help="ModelConfig fields of a preset or run, e.g. --n-loops 6 "
                                     "--loop_mode=lt (the syntax of `loopedlm train`; "
                                     "--n-loops N is --n_loops=N)")
    p.set_defaults(func=partial(_cmd_info, trailing))
    p = add_command(subparsers, "import-nanochat")
    p.add_argument("source", help="folder with model_<step>.pt + meta_<step>.json, or the .pt file")
    p.add_argument("out", help="output model folder (model.safetensors + config.json)")
    p.add_argument("--step", type=int, default=None, help="step to import (default: the latest)")
    p.set_defaults(func=_cmd_import)
