"""`loopedlm import-hf SRC OUT`: a public looped model's Hugging Face folder (Ouro, Huginn) as
a loopedlm checkpoint folder (`loopedlm.data.hf_import` does the work). Every command also
takes SRC directly: `loopedlm sample SRC`, `loopedlm serve SRC`, `loopedlm eval SRC`."""

from __future__ import annotations

import argparse
from typing import Any

from loopedlm.cli import add_command


def _cmd_import(args: argparse.Namespace) -> int:
    from loopedlm.data.hf_import import import_public_model

    out = import_public_model(args.src, args.out, dtype=args.dtype, force=args.force)
    print(f"imported {args.src} to {out}: "
          + ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())))
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm import-hf`."""
    p = add_command(
        subparsers, "import-hf",
        description="Write a public looped model's Hugging Face folder (config.json, "
                    "safetensors, tokenizer.json; model_type ouro or huginn_raven) as a "
                    "loopedlm checkpoint folder. Every weight is mapped by name; an unknown or "
                    "missing one is an error. Commands also take SRC itself.")
    p.add_argument("src", help="the Hugging Face model folder (downloaded beforehand)")
    p.add_argument("out", help="the folder to write (new or empty)")
    p.add_argument("--dtype", default="auto",
                   help="the weights' dtype: auto (as stored, e.g. bf16), bf16, fp16 or fp32")
    p.add_argument("--force", action="store_true", help="replace OUT when it is not empty")
    p.set_defaults(func=_cmd_import)


__all__ = ["register"]
