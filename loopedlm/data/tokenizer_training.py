"""Training a byte-level BPE tokenizer on a corpus, and measuring a tokenizer's compression.

The BPE is HF `tokenizers`' with nanochat's (GPT-4 style) pre-tokenisation, no normaliser and
one special token, BOS; it is loaded back as a `loopedlm.data.tokenizer.BPETokenizer`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from loopedlm.common.validation import is_int
from loopedlm.data.loader import iter_texts
from loopedlm.data.tokenizer import BOS_TOKEN, BPETokenizer, Tokenizer

logger = logging.getLogger(__name__)

# nanochat's (GPT-4 style) pre-tokenisation: numbers split into groups of at most 2 digits
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_chars: int | None = None,
                    ) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` ids (256 bytes + BOS + merges) on `texts`.

    `max_chars` caps the characters read from `texts` (the trainer holds word counts in
    memory). If the corpus has fewer distinct merges than asked for, the vocabulary is
    smaller than `vocab_size` and a warning says so.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    minimum = 256 + 1
    if not is_int(vocab_size) or vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs at least "
                         f"{minimum} ids (256 bytes + the BOS token)")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r} must be >= 1 (or None for no limit)")
    hf = HFTokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[BOS_TOKEN],
    )
    seen = {"chars": 0, "docs": 0}

    def capped() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise ValueError(f"training text {seen['docs']} is a {type(text).__name__}, "
                                 f"not a str")
            if max_chars is not None and seen["chars"] >= max_chars:
                return
            if max_chars is not None:
                text = text[: max_chars - seen["chars"]]
            seen["chars"] += len(text)
            seen["docs"] += 1
            yield text

    t0 = time.perf_counter()
    hf.train_from_iterator(capped(), trainer=trainer)
    if seen["chars"] == 0:
        raise ValueError("no training text: the corpus given to train_tokenizer is empty")
    tok = BPETokenizer(hf)
    logger.info("trained a byte-level BPE of %d ids on %d documents (%d chars) in %.1fs",
                tok.vocab_size, seen["docs"], seen["chars"], time.perf_counter() - t0)
    if tok.vocab_size < vocab_size:
        logger.warning("the corpus only supports %d ids, fewer than the %d asked for",
                       tok.vocab_size, vocab_size)
    return tok


def train_tokenizer_on_corpus(data_dir: str | Path, vocab_size: int, out: str | Path, *,
                              max_chars: int | None = None) -> tuple[BPETokenizer, Path]:
    """Train a byte-level BPE on the `train` split of a Parquet corpus and save it into
    `out`; returns the tokenizer and the folder it was saved in."""
    tokenizer = train_tokenizer(iter_texts(data_dir, "train"), vocab_size, max_chars=max_chars)
    return tokenizer, tokenizer.save(out)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str], batch: int = 256) -> float:
    """Compression: UTF-8 bytes of `texts` per token (higher = fewer tokens per byte)."""
    n_bytes = n_tokens = 0
    chunk: list[str] = []

    def flush() -> None:
        nonlocal n_bytes, n_tokens
        n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(chunk))
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) >= batch:
            flush()
    flush()
    if n_tokens == 0:
        raise ValueError("no text to measure compression on")
    return n_bytes / n_tokens


def split_compression(tokenizer: Tokenizer, data_dir: str | Path, split: str = "val") -> float:
    """`bytes_per_token` of `tokenizer` over one split of a Parquet corpus."""
    return bytes_per_token(tokenizer, iter_texts(data_dir, split))


__all__ = ["train_tokenizer", "train_tokenizer_on_corpus", "bytes_per_token",
           "split_compression"]
