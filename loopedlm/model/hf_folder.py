"""Reading back a Hugging Face folder written by `loopedlm export` (loopedlm.export.hf), so that
`loopedlm sample`, `eval` and `serve` take it like a checkpoint folder.

Such a folder is recognised by its `config.json`: `model_type` is `loopedlm`. It holds
every `ModelConfig` field at the top level (beside the names `transformers` needs), the
weights under loopedlm's own state-dict names in `model.safetensors`, loopedlm's tokenizer
in `tokenizer/`, and the run's record (step, training settings, validation BPB, budget
table) in `loopedlm.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from loopedlm.model.config import ModelConfig

MODEL_TYPE = "loopedlm"  # config.json's model_type (also in export/hf_code/configuration_loopedlm.py)
RECORD_FILE = "loopedlm.json"  # the run's record: what the model card is written from
# ModelConfig fields added after `loopedlm export` first wrote folders: absent, they take
# their defaults (loopedlm's own backbone), which is what those folders hold
LATER_FIELDS = frozenset({"backbone", "mlp_hidden", "norm_eps", "tie_embeddings", "qk_bias",
                          "n_prelude", "n_coda", "state_init"})


def is_exported_folder(path: str | Path) -> bool:
    """Whether `path` is a folder written by `loopedlm export`."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def exported_meta(folder: str | Path) -> dict[str, Any] | None:
    """A loopedlm checkpoint's `config.json` contents (`{"model": {...}, ...}`) for an
    exported folder: its ModelConfig fields and its run record; None for any other folder."""
    folder = Path(folder)
    if not is_exported_folder(folder):
        return None
    data = json.loads((folder / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = sorted(fields - set(data) - LATER_FIELDS)
    if missing:
        raise ValueError(f"{folder / 'config.json'} lacks the ModelConfig field(s) {missing}: "
                         f"not written by `loopedlm export`")
    record_path = folder / RECORD_FILE
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{record_path} is not readable JSON ({exc})") from None
    return {**record, "model": {name: data[name] for name in fields if name in data}}


__all__ = ["MODEL_TYPE", "RECORD_FILE", "is_exported_folder", "exported_meta"]
