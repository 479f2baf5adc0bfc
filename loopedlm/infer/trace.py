"""The per-loop view of generated text (the "logit lens" over loops): for each generated
token, the model's next-token distribution after every loop, summarised as its top tokens
and its entropy, so one can watch an answer form loop by loop.

It reads `LoopedGPT.forward(..., return_loop_logits=True)` over the prompt and the
generated tokens in one teacher-forced pass. For a fixed loop count that pass gives the
exact distributions decoding sampled from (cached decoding equals the full forward,
docs/design.md#invariants); with adaptive loops, a token that stopped early was decoded
from an earlier loop's distribution, and its trace shows every loop up to `n_loops`.
`loopedlm sample --trace-loops` prints it; the web page of `loopedlm serve` shows it when a
token is hovered (POST /v1/loop_trace).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_TOP_K = 5


@torch.no_grad()
def trace_loops(model: Any, prompt_ids: Sequence[int], generated_ids: Sequence[int], *,
                n_loops: int | None = None, top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
    """One entry per generated token: `{"token": id, "loops": [...]}` where loops[t-1]
    describes the distribution the token was drawn from after loop t:
    `{"top": [[id, p], ...] (top_k, most likely first), "entropy": nats, "p": the
    generated token's probability}`."""
    prompt_ids, generated_ids = list(prompt_ids), list(generated_ids)
    if not prompt_ids:
        raise ValueError("the prompt is empty: at least one token is needed")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} is not allowed: an integer >= 1")
    if not generated_ids:
        return []
    ids = prompt_ids + generated_ids
    limit = model.config.sequence_len
    if len(ids) - 1 > limit:
        raise ValueError(f"prompt and generated tokens ({len(ids)}) are longer than the "
                         f"context (sequence_len={limit}) + 1")
    device = model.lm_head.weight.device
    idx = torch.tensor(ids[:-1], dtype=torch.long, device=device)[None]
    was_training = model.training
    model.eval()
    try:
        _, per_loop = model(idx, n_loops=n_loops, return_loop_logits=True)
    finally:
        model.train(was_training)
    # the logits at position k predict token k + 1: the generated ones start at the prompt's end
    logits = per_loop[:, 0, len(prompt_ids) - 1:].float()  # (loops, generated, vocab)
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(-1)  # (loops, generated)
    top_p, top_ids = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    target = torch.tensor(generated_ids, device=device)
    chosen = probs.gather(-1, target.expand(probs.size(0), -1)[..., None])[..., 0]
    top_p, top_ids = top_p.cpu().tolist(), top_ids.cpu().tolist()
    entropy, chosen = entropy.cpu().tolist(), chosen.cpu().tolist()
    return [{"token": token,
             "loops": [{"top": [[i, p] for i, p in zip(top_ids[t][k], top_p[t][k], strict=True)],
                        "entropy": entropy[t][k], "p": chosen[t][k]}
                       for t in range(len(top_ids))]}
            for k, token in enumerate(generated_ids)]


def format_trace(trace: list[dict[str, Any]], tokenizer: Any, *, top_k: int = 3) -> str:
    """The trace as text: one block per generated token, one line per loop
    (`loop t  H=entropy  p=prob of the token  top: 'a' 0.52  'b' 0.20 ...`)."""
    lines = []
    for k, entry in enumerate(trace):
        lines.append(f"token {k + 1}: {tokenizer.decode([entry['token']])!r}")
        for t, step in enumerate(entry["loops"], start=1):
            top = "  ".join(f"{tokenizer.decode([i])!r} {p:.2f}" for i, p in step["top"][:top_k])
            lines.append(f"  loop {t:2d}  H={step['entropy']:.2f}  p={step['p']:.2f}  top: {top}")
    return "\n".join(lines)


__all__ = ["trace_loops", "format_trace", "DEFAULT_TOP_K"]
