"""`loopedlm export RUN OUT`: a run as a Hugging Face folder (`loopedlm.export.hf` does the
work) that `transformers`, its `generate()` and lm-eval's `hf` model load:

    loopedlm export runs/flt my-flt
    python -c "from transformers import AutoModelForCausalLM as A; \\
               A.from_pretrained('my-flt', trust_remote_code=True)"
    lm_eval --model hf --model_args pretrained=my-flt,trust_remote_code=True --tasks piqa
"""

from __future__ import annotations

import argparse
from typing import Any

from loopedlm.cli import add_command


def _cmd_export(args: argparse.Namespace) -> int:
    from loopedlm.export.hf import export_hf

    out = export_hf(args.run, args.out, checkpoint=args.checkpoint, force=args.force)
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    print(f"exported {args.run} to {out}: {', '.join(files)}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm export`."""
    p = add_command(
        subparsers, "export",
        description="Write a run (its newest intact checkpoint), a checkpoint folder or an "
                    "exported folder as a Hugging Face folder: config.json, model.safetensors, "
                    "the model code (torch + transformers only), the tokenizer, "
                    "generation_config.json and a README.md model card. Load it with "
                    "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).")
    p.add_argument("run", help="run folder, checkpoint folder or exported folder")
    p.add_argument("out", help="the folder to write (new or empty)")
    p.add_argument("--checkpoint", default=None,
                   help="a run's checkpoint to export: its step (6) or name (step_000006); "
                        "default: the newest intact one")
    p.add_argument("--force", action="store_true", help="replace OUT when it is not empty")
    p.set_defaults(func=_cmd_export)


__all__ = ["register"]
