"""Scoring token sequences from logits: the mean loss, greedy match and log-probability of a
span of each sequence, batched across sequences under a logits budget (used by the CORE
evaluator and the lm-eval adapter)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# Logits held at once by one batch (floats); 2**27 floats = 512 MB of fp32.
DEFAULT_LOGITS_BUDGET = 2**27


@torch.no_grad()
def score_sequences(model: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                    ends: Sequence[int], *, n_loops: int | None = None,
                    device: str | torch.device = "cpu",
                    logits_budget: int = DEFAULT_LOGITS_BUDGET,
                    vocab_size: int | None = None) -> tuple[list[float], list[bool], list[float]]:
    """For each sequence: mean token loss over `[start, end)`, whether greedy argmax
    reproduces those tokens exactly, and their summed log-probability.

    Sequences are sorted by length and right-padded (padding never influences earlier
    positions in a causal model) into batches of at most `logits_budget` logits. The last
    token is never an input (nothing is predicted from it), so a sequence may hold one token
    more than the model takes (`config.rotary_len + 1` for a LoopedGPT).
    """
    n = len(sequences)
    if n == 0:
        return [], [], []
    for s, b, e in zip(sequences, starts, ends, strict=True):
        if not 1 <= b < e <= len(s):
            raise ValueError(f"scored span [{b}, {e}) is not inside a sequence of {len(s)} "
                             f"tokens (position 0 has no prediction)")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or vocab_size or 1
    order = sorted(range(n), key=lambda i: -len(sequences[i]))
    mean_loss, greedy, logprob = [0.0] * n, [False] * n, [0.0] * n
    pos = 0
    while pos < n:
        longest = len(sequences[order[pos]])
        per_batch = max(1, logits_budget // max(1, longest * vocab))
        batch = order[pos:pos + per_batch]
        pos += len(batch)
        idx = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            idx[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        idx = idx.to(device)
        kwargs = {} if n_loops is None else {"n_loops": n_loops}
        logits = model(idx[:, :-1], **kwargs).float()  # position t predicts token t + 1
        losses = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(),
                                 reduction="none").view(len(batch), longest - 1)
        hits = logits.argmax(-1) == idx[:, 1:]
        for row, i in enumerate(batch):
            span = slice(starts[i] - 1, ends[i] - 1)
            row_losses = losses[row, span]
            mean_loss[i] = float(row_losses.mean())
            logprob[i] = -float(row_losses.sum())
            greedy[i] = bool(hits[row, span].all())
    return mean_loss, greedy, logprob
