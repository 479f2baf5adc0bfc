"""Loading a run for evaluation: the model, its tokenizer, its training data and the
validation settings its own evaluation used (shared by `loopedlm eval`, the lm-eval
adapter and the benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _find_key(data: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a nested JSON object."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def run_data_dir(model_folder: Path, meta: dict[str, Any]) -> Path | None:
    """The training data folder recorded with the run ("" means the bundled corpus)."""
    configs = [meta]
    for folder in [model_folder, *model_folder.parents][:3]:
        if (folder / "config.json").is_file():
            try:
                configs.append(json.loads((folder / "config.json").read_text()))
            except json.JSONDecodeError:
                continue
    for config in configs:
        value = _find_key(config, "data_dir")
        if value is not None:
            if value:
                return Path(value)
            from loopedlm.data.corpus import default_data_dir
            return default_data_dir()
    return None


def load_run(path: str | Path, device: str = "cpu", tokenizer: str | None = None):
    """(model, tokenizer, model_folder, meta) of a run folder or a checkpoint folder."""
    from loopedlm.data.tokenizer import load_tokenizer
    from loopedlm.model.checkpoint import find_tokenizer_dir, load_model, resolve_model_folder

    folder = resolve_model_folder(path)
    model, meta = load_model(folder, device=device)
    if tokenizer is None:
        tok_dir = find_tokenizer_dir(folder)
        if tok_dir is None:
            raise FileNotFoundError(f"no tokenizer/ folder saved with {path}; pass --tokenizer "
                                    f"(qwen3 or a tokenizer folder)")
        tokenizer = str(tok_dir)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    return model, tok, folder, meta


def val_settings(meta: dict[str, Any], model: Any, batch_size: int | None,
                 val_batches: int | None) -> dict[str, Any]:
    """How to read the validation split: by default the batches that training measured
    (the run's device_batch_size x sequence_len, eval_tokens of them), so `eval` and
    `train` report the same val_bpb for a checkpoint; else 20 batches of 8 sequences."""
    train = meta.get("train") if isinstance(meta.get("train"), dict) else {}
    if batch_size is None and val_batches is None and train.get("eval_tokens"):
        size = int(train.get("device_batch_size") or 8)
        seq_len = int(train.get("sequence_len") or model.config.sequence_len)
        return {"val_batch_size": size, "val_seq_len": seq_len,
                "val_batches": max(1, int(train["eval_tokens"]) // (size * seq_len)),
                "batch_size": 8}
    return {"val_batch_size": batch_size or 8, "val_seq_len": None,
            "val_batches": val_batches or 20, "batch_size": batch_size or 8}
