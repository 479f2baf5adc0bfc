"""Perplexity on WikiText-2 (a local file) and on the held-out validation shard (docs/design.md#evaluation).

WikiText-2 ships in no package, so the user gives its path, in either standard layout:
- the raw release: `wiki.valid.raw` (from `wikitext-2-raw-v1.zip`), or its folder;
- the Hugging Face Parquet layout: `wikitext-2-raw-v1/validation-00000-of-00001.parquet`
  (a `text` column, one line per row, newlines kept), or a folder holding it.

The text is tokenized line by line (BOS first), concatenated, and cut into non-overlapping
windows of `seq_len` predicted tokens; every token but the first is predicted exactly once,
with the context of its own window. Perplexity is per token of the model's tokenizer, so
only models that share a tokenizer compare; BPB (reported too) compares across tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from loopedlm.evaluate.bpb import evaluate_bpb
from loopedlm.evaluate.tasks import EVAL_BATCH_SIZE

RAW_NAMES = ("wiki.valid.raw", "wiki.valid.tokens")
PARQUET_GLOBS = ("validation-*.parquet", "*valid*.parquet", "wikitext-2-raw-v1/validation-*.parquet")


def find_wikitext_file(path: str | Path) -> Path:
    """The validation file at `path` (a file, or a folder in one of the layouts above)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"WikiText-2 path {path} does not exist (give wiki.valid.raw or "
                                f"a validation-*.parquet file, or their folder)")
    if path.is_file():
        return path
    for name in RAW_NAMES:
        if (path / name).is_file():
            return path / name
    for pattern in PARQUET_GLOBS:
        found = sorted(path.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{path} holds no WikiText-2 validation file: looked for "
                            f"{list(RAW_NAMES)} and {list(PARQUET_GLOBS)}")


def read_wikitext(path: str | Path) -> str:
    """The validation text: the raw file as is, or the Parquet `text` rows joined."""
    file = find_wikitext_file(path)
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"{file} is not a readable Parquet file: {exc}") from None
        if "text" not in table.column_names:
            raise ValueError(f"{file} has no 'text' column (columns: {table.column_names})")
        text = "".join(t or "" for t in table.column("text").to_pylist())
    else:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{file} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise ValueError(f"{file} holds no text")
    return text


def token_windows(tokens: list[int], seq_len: int, batch_size: int,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of non-overlapping windows; the tail is padded with
    ignored (-1) targets."""
    stream = torch.tensor(tokens, dtype=torch.long)
    n_windows = max(1, -(-(len(tokens) - 1) // seq_len))
    inputs = torch.zeros(n_windows, seq_len, dtype=torch.long)
    targets = torch.full((n_windows, seq_len), -1, dtype=torch.long)
    for w in range(n_windows):
        chunk = stream[w * seq_len: w * seq_len + seq_len + 1]
        inputs[w, :len(chunk) - 1] = chunk[:-1]
        targets[w, :len(chunk) - 1] = chunk[1:]
    for b in range(0, n_windows, batch_size):
        yield inputs[b:b + batch_size], targets[b:b + batch_size]


def evaluate_text(model: Any, tokenizer: Any, text: str, *, n_loops: int | None = None,
                  seq_len: int | None = None, batch_size: int = EVAL_BATCH_SIZE,
                  max_tokens: int | None = None,
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """Perplexity and BPB of `model` on `text` (see the module docstring)."""
    seq_len = seq_len or model.config.sequence_len
    lines = text.splitlines(keepends=True)
    tokens = [tokenizer.bos_id]
    for ids in tokenizer.encode_batch(lines):
        tokens += ids
        if max_tokens is not None and len(tokens) > max_tokens:
            tokens = tokens[:max_tokens + 1]
            break
    if len(tokens) < 2:
        raise ValueError("the text has no tokens to predict")
    return evaluate_bpb(model, token_windows(tokens, seq_len, batch_size),
                        tokenizer.token_bytes(), n_loops=n_loops, device=device)


def evaluate_wikitext(model: Any, tokenizer: Any, path: str | Path, **kwargs: Any,
                      ) -> dict[str, float]:
    """WikiText-2 validation perplexity (and BPB); `kwargs` as `evaluate_text`."""
    return {**evaluate_text(model, tokenizer, read_wikitext(path), **kwargs),
            "file": str(find_wikitext_file(path))}


def evaluate_val_shard(model: Any, tokenizer: Any, data_dir: str | Path, *,
                       n_loops: int | None = None, batch_size: int = EVAL_BATCH_SIZE,
                       seq_len: int | None = None, max_batches: int | None = None,
                       device: str | torch.device = "cpu") -> dict[str, float]:
    """BPB and perplexity on the held-out validation shard (one pass, DDP-aware)."""
    import torch.distributed as dist

    from loopedlm.data.loader import ParquetTokenLoader

    rank, world = (dist.get_rank(), dist.get_world_size()) if (
        dist.is_available() and dist.is_initialized()) else (0, 1)
    loader = ParquetTokenLoader(data_dir, tokenizer, batch_size, seq_len or
                                model.config.sequence_len, split="val", rank=rank,
                                world_size=world, device=device, loop=False)
    return evaluate_bpb(model, loader, tokenizer.token_bytes(), n_loops=n_loops,
                        max_batches=max_batches, device=device)
