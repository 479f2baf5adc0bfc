"""The reference decoder: one step of the model's own forward with a `KVCache`
(`decode_step`, optionally with adaptive loops) and host-side sampling with a
`torch.Generator` (`sample_next`). Generation runs on the decode engine
(`loopedlm.infer.generate`); these are kept as the reference that tests and benchmarks
compare it with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loopedlm.infer.options import AdaptiveLoops
from loopedlm.model.attention import KVCache, norm
from loopedlm.model.gpt import LoopedGPT


@torch.no_grad()
def decode_step(model: LoopedGPT, tokens: torch.Tensor, cache: KVCache, *,
                adaptive: AdaptiveLoops | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one token per row (`tokens` (B, 1)) to `cache`; return the next-token logits
    (B, vocab_size) and the loops spent per row (B,).

    Without `adaptive` this is the model's own forward (exact). With it, each row stops
    after the first loop t >= min_loops whose state has converged; rows that stopped are
    dropped from the batch for the remaining loops, so their blocks are never run.
    """
    n_loops, batch = cache.n_loops, tokens.size(0)
    if adaptive is None:
        logits = model(tokens, n_loops=n_loops, kv_cache=cache)[:, -1]
        return logits, torch.full((batch,), n_loops, dtype=torch.long)
    inputs = model.prepare(tokens, kv_cache=cache)
    final = torch.empty_like(inputs.embedded)
    spent = torch.zeros(batch, dtype=torch.long)
    active = torch.arange(batch, device=tokens.device)
    previous = previous_logp = None  # of the active rows
    for loop in range(n_loops):
        full = active.numel() == batch
        x = model.loop(inputs if full else inputs.select_rows(active), previous, loop)
        h = norm(x)
        if full:  # (the common case kept free of indexing: it is per loop and per token)
            spent += 1
        else:
            spent[active.cpu()] += 1
        if loop == n_loops - 1:
            if full:
                final = h
            else:
                final[active] = h
            break
        logp = None
        if adaptive.criterion == "kl":
            logp = F.log_softmax(model.logits(h[:, -1]), dim=-1)
        if loop + 1 < adaptive.min_loops:
            previous, previous_logp = h, logp
            continue
        if adaptive.criterion == "state":
            change = (h - previous).float().norm(dim=-1) / h.float().norm(dim=-1)
            converged = change[:, -1] < adaptive.threshold
        else:
            kl = (logp.exp() * (logp - previous_logp)).sum(-1)
            converged = kl < adaptive.threshold
        if bool(converged.any()):
            done = active[converged]
            final[done] = h[converged]
            cache.fill_loops_from(loop, done)
            keep = ~converged
            active, h = active[keep], h[keep]
            logp = None if logp is None else logp[keep]
            if active.numel() == 0:
                break
        previous, previous_logp = h, logp
    cache.advance(tokens.size(1), torch.ones_like(tokens, dtype=torch.bool))
    return model.logits(final)[:, -1], spent


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy when temperature == 0, else softmax
    sampling at `temperature` restricted to the `top_k` most likely tokens and to the
    smallest set whose probability reaches `top_p` (nucleus)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["decode_step", "sample_next"]
