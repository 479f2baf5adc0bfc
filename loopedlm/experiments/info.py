"""`loopedlm info` (what a preset or run is: sizes, FLOPs per loop) and
`loopedlm import-nanochat` (convert an FLT-authors checkpoint into a loopedlm model folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loopedlm.model.config import PRESETS, ModelConfig
from loopedlm.model.gpt import LoopedGPT


def describe(config: ModelConfig) -> dict:
    """Sizes and per-token training FLOPs of a config at several loop counts."""
    with torch.device("meta"):
        model = LoopedGPT(config)
    return {
        "config": config.to_dict(),
        "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embedding=True),
        "train_flops_per_token": {n: model.estimate_flops(n) for n in (1, 3, 6, 9, 12)},
    }


def format_table(name: str, info: dict) -> str:
    """`describe()` as a plain-text table for people (`--json` gives the dict itself)."""
    config = info["config"]
    rows = [("parameters", f"{info['params']:,}"),
            ("  without embeddings", f"{info['params_non_embedding']:,}")]
    rows += [(key, str(value)) for key, value in config.items()]
    width = max(len(key) for key, _ in rows)
    lines = [f"{name}: {config['loop_mode']}, {config['n_loops']} loops"]
    lines += [f"  {key:<{width}}  {value}" for key, value in rows]
    lines.append("  training FLOPs per token (all loops counted):")
    lines += [f"    N={n:<3} {flops:.4g}" for n, flops in info["train_flops_per_token"].items()]
    return "\n".join(lines)


def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"override {pair!r} must look like key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _info(args: argparse.Namespace) -> int:
    if args.target in PRESETS:
        config = ModelConfig.preset(args.target, **_parse_overrides(args.set))
    else:
        from loopedlm.model.checkpoint import CONFIG_FILE, resolve_model_folder

        if not Path(args.target).exists():
            raise FileNotFoundError(f"{args.target!r} is neither a preset ({', '.join(PRESETS)}) "
                                    "nor a run or checkpoint folder")
        folder = resolve_model_folder(args.target)
        config = ModelConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text())["model"])
    info = describe(config)
    print(json.dumps(info, indent=2) if args.json else format_table(args.target, info))
    return 0


def _import(args: argparse.Namespace) -> int:
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
    p = subparsers.add_parser("info", help="sizes and FLOPs of a preset or a run")
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a run/checkpoint folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override ModelConfig fields of a preset, e.g. --set loop_mode=lt n_loops=6")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of "
                                                            "a table")
    p.set_defaults(func=_info)
    p = subparsers.add_parser("import-nanochat",
                              help="convert an FLT-authors (nanochat fork) checkpoint")
    p.add_argument("source", help="folder with model_<step>.pt + meta_<step>.json, or the .pt file")
    p.add_argument("out", help="output model folder (model.safetensors + config.json)")
    p.add_argument("--step", type=int, default=None, help="step to import (default: the latest)")
    p.set_defaults(func=_import)
