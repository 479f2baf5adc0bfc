"""What a preset or run is (`loopedlm info`): its config, sizes and training FLOPs per
token at several loop counts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loopedlm.common.overrides import coerce_fields, parse_overrides
from loopedlm.evaluate.tasks import PAPER_LOOPS
from loopedlm.model.checkpoint import resolve_model_folder, saved_model_config
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
        "train_flops_per_token": {n: model.estimate_flops(n) for n in PAPER_LOOPS},
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


def preset_overrides(settings: Sequence[str] = (), pairs: Sequence[str] = ()) -> dict[str, Any]:
    """ModelConfig overrides of a preset from `--key=value` settings (the one syntax of
    loopedlm.common.overrides, as in `loopedlm train`) and `key=value` pairs (the older
    `--set` spelling), each value coerced to its field's type."""
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like key=value")
    _, overrides = parse_overrides([*(f"--{pair}" for pair in pairs), *settings],
                                   shorthands={"n_loops": "n_loops"})  # --n-loops 6 too
    return coerce_fields(ModelConfig, overrides)


def target_config(target: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of a preset or of a run or checkpoint folder, with `overrides`
    (e.g. a run's sizes and FLOPs at another loop count)."""
    if target in PRESETS:
        return ModelConfig.preset(target, **(overrides or {}))
    if not Path(target).exists():
        raise FileNotFoundError(f"{target!r} is neither a preset ({', '.join(PRESETS)}) "
                                "nor a run or checkpoint folder")
    folder = resolve_model_folder(target)
    return ModelConfig.from_dict({**saved_model_config(folder), **(overrides or {})})


__all__ = ["describe", "format_table", "preset_overrides", "target_config"]
