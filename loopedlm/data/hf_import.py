"""`loopedlm import-hf SRC OUT`: a public looped model's Hugging Face folder (Ouro;
docs/public_models.md) written as a loopedlm checkpoint folder: `model.safetensors` under
loopedlm's weight names, `config.json` (`{"model": ModelConfig fields, "public": {...}}`),
`manifest.json` and the tokenizer in `tokenizer/`. Every command also loads SRC directly
(`loopedlm.data.runs.load_run`); importing checks the folder once, and can convert the dtype.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from loopedlm.data.tokenizer import load_hf_folder_tokenizer
from loopedlm.model.checkpoint import save_model
from loopedlm.model.public import PublicModelError, load_public_model, public_config

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def import_public_model(src: str | Path, out: str | Path, *, dtype: str = "auto",
                        force: bool = False) -> Path:
    """Write SRC (a public looped model's folder) into OUT (new or empty, or replaced with
    `force`) as a loopedlm checkpoint folder; `dtype` converts the weights ("auto": as
    stored). Returns OUT."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {list(DTYPES)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    public_config(src)  # another architecture or an unsupported value: one line, before any work
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty: choose a new folder or pass --force")
        if out.resolve() == src.resolve():
            raise ValueError(f"{out} is the source folder")
        shutil.rmtree(out)
    model, meta = load_public_model(src, dtype=DTYPES[dtype])
    tokenizer = load_hf_folder_tokenizer(src)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise PublicModelError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                               f"model's vocab_size is {model.config.vocab_size}")
    tokenizer.save(out / "tokenizer")
    save_model(out, model, {key: value for key, value in meta.items() if key != "model"})
    return out


__all__ = ["import_public_model", "DTYPES"]
