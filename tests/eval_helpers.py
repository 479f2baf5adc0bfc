"""Helpers shared by the evaluation tests (a helper module, not a test file): a byte-level
tokenizer that satisfies the Tokenizer contract, scripted models whose probabilities are set
by hand, and untrained tiny models (from the one model factory, `conftest.tiny_model`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from conftest import tiny_model

from loopedlm import LoopedGPT, ModelConfig

BYTE_VOCAB = 257  # 256 bytes + BOS


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is BOS (a special token, 0 bytes)."""

    name = "bytes"
    vocab_size = BYTE_VOCAB
    bos_id = 256
    special_ids = {256}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def encode_documents(self, texts) -> np.ndarray:
        """(used by loopedlm.data.loader beyond the shared contract) BOS + each document, flat."""
        out: list[int] = []
        for ids in self.encode_batch(texts):
            out += [self.bos_id, *ids]
        return np.asarray(out, dtype=np.int32)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        table = torch.ones(BYTE_VOCAB, dtype=torch.long)
        table[self.bos_id] = 0
        return table

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "bytes.json").write_text(json.dumps({"name": "bytes"}))
        return directory


class TableModel(nn.Module):
    """A causal 'model' whose next-token distribution after a given prefix is set by hand:
    `table[prefix tuple] = {token: probability}`; unspecified mass is spread uniformly."""

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab_size: int = BYTE_VOCAB,
                 sequence_len: int = 512):
        super().__init__()
        self.table = table
        self.config = ModelConfig(depth=1, d_model=32, n_head=1, vocab_size=vocab_size,
                                  sequence_len=sequence_len)
        self.calls: list[int | None] = []

    def forward(self, idx: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        self.calls.append(n_loops)
        B, T = idx.shape
        V = self.config.vocab_size
        logits = torch.zeros(B, T, V)
        rows = idx.tolist()
        for b in range(B):
            for t in range(T):
                spec = self.table.get(tuple(rows[b][:t + 1]))
                if spec:
                    rest = (1.0 - sum(spec.values())) / (V - len(spec))
                    probs = torch.full((V,), rest)
                    for tok, p in spec.items():
                        probs[tok] = p
                    logits[b, t] = probs.log()
        return logits


def oracle_model(gold_sequences: list[list[int]], vocab_size: int = BYTE_VOCAB) -> TableModel:
    """Puts all probability on the next token of a gold sequence (prefix match)."""
    table: dict[tuple[int, ...], dict[int, float]] = {}
    for seq in gold_sequences:
        for t in range(len(seq) - 1):
            table[tuple(seq[:t + 1])] = {seq[t + 1]: 1.0 - 1e-6}
    return TableModel(table, vocab_size)


def tiny_random_model(vocab_size: int = BYTE_VOCAB, sequence_len: int = 128, seed: int = 0,
                      n_loops: int = 2) -> LoopedGPT:
    """An untrained one-block LoopedGPT (as `init_weights` leaves it): near-uniform,
    effectively random predictions."""
    return tiny_model(seed, std=None, depth=1, n_head=1, vocab_size=vocab_size,
                      sequence_len=sequence_len, n_loops=n_loops)


def nats(p: float) -> float:
    return -math.log(p)
