"""Loading what inference needs from a run: the tokenizer saved beside its checkpoints
(used by `loopedlm sample`, `loopedlm serve` and the decoding benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopedlm.data.tokenizer import load_tokenizer
from loopedlm.model.checkpoint import find_tokenizer_dir, resolve_model_folder


def load_run_tokenizer(run: str | Path) -> Any:
    """The tokenizer of a run folder or checkpoint folder (its `tokenizer/` folder)."""
    folder = find_tokenizer_dir(resolve_model_folder(run))
    if folder is None:
        raise FileNotFoundError(f"{run} has no tokenizer/ folder beside its checkpoints")
    return load_tokenizer(folder)


__all__ = ["load_run_tokenizer"]
