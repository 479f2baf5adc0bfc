"""Bits per byte and perplexity from per-token losses (docs/design.md#evaluation).

BPB = sum of token losses (nats) / (ln 2 * sum of the UTF-8 bytes of the target tokens).
Targets that are ignored (-1) or special (0 bytes in `token_bytes`) count in neither sum, so
the figure does not depend on the tokenizer. Perplexity is `exp(mean NLL)` over the same
tokens. Under torch.distributed the three sums are all-reduced before dividing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _last_loop_nats(model: Any, inputs: torch.Tensor, targets: torch.Tensor,
                    n_loops: int | None) -> torch.Tensor:
    """Sum of the last loop's token losses over the non-ignored targets. A LoopedGPT goes
    through the fused head (`LoopedGPT.loss`: no logits held, whatever its `loss_loops`);
    any other model through its logits."""
    if hasattr(model, "prepare") and hasattr(model, "loss"):
        n_loops = model.config.loops(n_loops)
        loop_inputs, previous = model.prepare(inputs), None
        for loop in range(n_loops):
            previous = model.loop_state(model.loop(loop_inputs, previous, loop))
        count = (targets >= 0).sum()
        # mean over the counted targets, times their count (0 when none: no 0/0 = nan)
        return torch.where(count > 0, model.loss(previous, targets, loop_inputs.plan).double() * count,
                           0.0)
    kwargs = {} if n_loops is None else {"n_loops": n_loops}
    logits = model(inputs, **kwargs).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-1, reduction="sum").double()


@torch.no_grad()
def loss_sums(model: Any, inputs: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor,
              *, n_loops: int | None = None) -> torch.Tensor:
    """(nats, bytes, tokens) summed over one batch's counted targets, as a float64 tensor on
    the targets' device. No host-device sync: masks, not boolean indexing."""
    n_bytes = token_bytes.to(targets.device)[targets.clamp(min=0)]
    counted = (targets >= 0) & (n_bytes > 0)
    nats = _last_loop_nats(model, inputs, torch.where(counted, targets, -1), n_loops)
    return torch.stack([nats, torch.where(counted, n_bytes, 0).double().sum(),
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

    The sums stay on the device (one sync at the end); on CUDA the forward runs under bf16
    autocast, as in training, unless the caller already set an autocast.
    Returns `{"bpb", "ppl", "nll", "tokens", "bytes", "batches"}`.
    """
    sums, n = None, 0
    for inputs, targets in batches:
        if max_batches is not None and n >= max_batches:
            break
        if device is not None:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
        if sums is None:
            sums = torch.zeros(3, dtype=torch.float64, device=targets.device)
            token_bytes = token_bytes.to(targets.device)  # once, not per batch
        with _autocast(targets.device):
            sums += loss_sums(model, inputs, targets, token_bytes, n_loops=n_loops)
        n += 1
    if n == 0:
        raise ValueError("no batches to evaluate")
    return {**summarise(sums), "batches": n}


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (where the caller has not chosen one), else nothing."""
    if device.type != "cuda" or torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)
