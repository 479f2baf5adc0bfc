"""Bits per byte and perplexity from per-token losses (SPEC 7).

BPB = sum of token losses (nats) / (ln 2 * sum of the UTF-8 bytes of the target tokens).
Targets that are ignored (-1) or special (0 bytes in `token_bytes`) count in neither sum, so
the figure does not depend on the tokenizer. Perplexity is `exp(mean NLL)` over the same
tokens. Under torch.distributed the three sums are all-reduced before dividing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def loss_sums(model: Any, inputs: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor,
              *, n_loops: int | None = None) -> torch.Tensor:
    """(nats, bytes, tokens) summed over one batch's counted targets, as a float64 tensor."""
    kwargs = {} if n_loops is None else {"n_loops": n_loops}
    logits = model(inputs, **kwargs).float()
    flat_targets = targets.reshape(-1)
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), flat_targets,
                             ignore_index=-1, reduction="none")
    n_bytes = token_bytes.to(flat_targets.device)[flat_targets.clamp(min=0)]
    counted = (flat_targets >= 0) & (n_bytes > 0)
    return torch.stack([losses[counted].double().sum(), n_bytes[counted].double().sum(),
                        counted.double().sum()])


def summarise(sums: torch.Tensor) -> dict[str, float]:
    """bpb, perplexity and mean NLL from (nats, bytes, tokens) sums (all-reduced under DDP)."""
    if dist.is_available() and dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums)
    nats, n_bytes, tokens = (float(x) for x in sums.tolist())
    if tokens == 0 or n_bytes == 0:
        raise ValueError("no counted target tokens: every target was ignored (-1) or special")
    mean_nll = nats / tokens
    return {"bpb": nats / (math.log(2) * n_bytes), "ppl": math.exp(mean_nll), "nll": mean_nll,
            "tokens": int(tokens), "bytes": int(n_bytes)}


def evaluate_bpb(model: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 token_bytes: torch.Tensor, *, n_loops: int | None = None,
                 max_batches: int | None = None,
                 device: str | torch.device | None = None) -> dict[str, float]:
    """BPB and perplexity of `model` over `(inputs, targets)` batches (at most `max_batches`).

    Returns `{"bpb", "ppl", "nll", "tokens", "bytes", "batches"}`.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    n = 0
    for inputs, targets in batches:
        if max_batches is not None and n >= max_batches:
            break
        if device is not None:
            inputs, targets = inputs.to(device), targets.to(device)
        sums += loss_sums(model, inputs, targets, token_bytes, n_loops=n_loops).to(sums.device)
        n += 1
    if n == 0:
        raise ValueError("no batches to evaluate")
    return {**summarise(sums), "batches": n}
