"""Loading a trained run the way every command reads it: its model (a run folder's newest
intact checkpoint, or a checkpoint folder) and the tokenizer saved beside its checkpoints.
`loopedlm sample`, `loopedlm serve`, `loopedlm eval`, the lm-eval adapter and the
benchmarks all load through `load_run`; it lives here, the lowest layer that has both the
model (`loopedlm.model.checkpoint`) and the tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from loopedlm.data.tokenizer import Tokenizer, load_tokenizer
from loopedlm.model.checkpoint import find_tokenizer_dir, load_model, resolve_model_folder
from loopedlm.model.gpt import LoopedGPT


class LoadedRun(NamedTuple):
    """A loaded run: the model (eval mode, on its device), its tokenizer, the model folder
    it came from and that folder's config.json."""

    model: LoopedGPT
    tokenizer: Tokenizer
    folder: Path
    meta: dict[str, Any]


def load_run(path: str | Path, device: str | torch.device = "cpu",
             tokenizer: str | None = None) -> LoadedRun:
    """The model and tokenizer of a run folder, a checkpoint folder or a public looped model's
    Hugging Face folder (its own tokenizer.json). `tokenizer` (`qwen3` or a tokenizer folder)
    replaces the one saved with the run."""
    folder = resolve_model_folder(path)
    model, meta = load_model(folder, device=device)
    if tokenizer is None and "public" in meta:
        tokenizer = str(folder)
    if tokenizer is None:
        saved = find_tokenizer_dir(folder)
        if saved is None:
            raise FileNotFoundError(f"{path} has no tokenizer/ folder beside its checkpoints")
        tokenizer = str(saved)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    return LoadedRun(model, tok, folder, meta)


__all__ = ["LoadedRun", "load_run"]
