"""Teacher-forced scoring through the decoding path: the next-token NLL of given text,
computed token by token the way generation computes it (the decode engine), so that the
quality cost of adaptive loops and shared cache slots can be measured."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loopedlm.infer.engine import DecodeEngine
from loopedlm.infer.options import AdaptiveLoops
from loopedlm.model.gpt import LoopedGPT


@dataclass
class DecodeScore:
    """Per-position next-token NLL (nats) and loops spent, from token-by-token decoding."""

    nll: torch.Tensor    # (B, T - prefill)
    loops: torch.Tensor  # (B, T - prefill)


@torch.no_grad()
def decode_nll(model: LoopedGPT, tokens: torch.Tensor, *, n_loops: int | None = None,
               prefill: int = 1, adaptive: AdaptiveLoops | None = None,
               cache_slots: int | None = None, slot_policy: str = "block") -> DecodeScore:
    """Teacher-forced NLL of `tokens` (B, T) computed the way generation computes it (the
    decode engine, in the model's dtype): the first `prefill` tokens in one pass, then one
    token at a time. With neither `adaptive` nor `cache_slots` it equals the full
    forward's loss; with them it measures their quality cost."""
    n_loops = model.config.loops(n_loops)
    batch, length = tokens.shape
    if not 1 <= prefill < length:
        raise ValueError(f"prefill={prefill} must lie in [1, {length})")
    engine = DecodeEngine(model, max_batch=batch, max_len=length - 1, max_loops=n_loops,
                          cache_slots=cache_slots, slot_policy=slot_policy,
                          dtype=model.lm_head.weight.dtype)
    logits = torch.stack([engine.prefill(r, tokens[r, :prefill], n_loops=n_loops,
                                         adaptive=adaptive)[-1] for r in range(batch)])
    spent = torch.full((batch,), n_loops, dtype=torch.long, device=tokens.device)
    nll, loops = [], []
    for t in range(prefill, length):
        nll.append(F.cross_entropy(logits.float(), tokens[:, t], reduction="none"))
        loops.append(spent)
        if t < length - 1:
            logits, spent = engine.decode(tokens[:, t])
    return DecodeScore(torch.stack(nll, 1).cpu(), torch.stack(loops, 1).cpu())


__all__ = ["DecodeScore", "decode_nll"]
