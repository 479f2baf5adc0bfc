"""Adaptive loops over a prompt (docs/design.md#decoding, `AdaptiveLoops.prompt`): each prompt
token stops looping by its exit criterion, as a decoded token does, in a prefill that runs
one pass per loop over the tokens still looping.

A prompt token at loop t attends over the keys of loop t at every earlier position. Fed one
at a time (`DecodeEngine.decode`, adaptive), an earlier token has written those keys if it
ran loop t, and otherwise its skipped loops hold the keys of its last loop. The prefill
gives each token exactly these keys: after every loop, the tokens that stopped have their
keys copied into the next loop's entries (`StaticKVCache.copy_loop`) before it runs, and a
token's own trajectory (its embedding, its previous state) is its own. So a prompt
prefilled this way leaves the cache, and the logits, that feeding it token by token leaves,
up to the rounding of batched arithmetic, and a row's result does not depend on the others
of its pass. While every token still loops the pass is the plain prefill's (same plan,
same writer: threshold 0 gives its bits); once some have stopped, each row's looping tokens
are gathered (padded to the row with the most), and only they are computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from loopedlm.infer.cache import StaticKVCache, TokenWrites
from loopedlm.infer.exits import EXIT_CRITERIA, LoopSignals, rows_converged, update_exit_cdf
from loopedlm.infer.options import CRITERIA
from loopedlm.model.attention import AttentionPlan
from loopedlm.model.gpt import LoopedGPT, LoopInputs


def adaptive_prefill(model: LoopedGPT, cache: StaticKVCache, slots: torch.Tensor,
                     tokens: torch.Tensor, inputs: LoopInputs, lengths: Sequence[int],
                     start: int, n_loops: int, settings: Sequence[Any],
                     gathered_plan: Callable[[torch.Tensor, TokenWrites], AttentionPlan],
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the prompts `tokens` (R, W) of rows `slots` (R,) adaptively, right-padded, at
    positions start .. start + W - 1. `inputs`: the plain prefill's (`LoopedGPT.prepare` under
    its plan and cache writer), for the loops that every token runs; `lengths`: each row's
    real tokens; `settings`: each row's resolved `AdaptiveLoops` (criterion `state` or `gate`,
    min_loops set); a token runs at most `n_loops` loops. `gathered_plan(pos, writer)`: the
    attention plan of a pass whose queries sit at positions pos (R, T), with that writer.

    Returns the state each token stopped with (R, W, d) and the loops it ran (R, W) (past a
    row's end: zeros). One or two host syncs per loop (which tokens still loop)."""
    rows, width = tokens.shape
    device = tokens.device
    valid = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    threshold = torch.tensor([s.threshold for s in settings], dtype=torch.float32,
                             device=device)[:, None].expand(rows, width)
    criteria = torch.tensor([CRITERIA.index(s.criterion) for s in settings],
                            device=device)[:, None].expand(rows, width)
    earliest = torch.tensor([s.min_loops for s in settings], device=device)[:, None]
    used = sorted({CRITERIA.index(s.criterion) for s in settings})
    gated = any(EXIT_CRITERIA[s.criterion].needs_gate for s in settings)
    looping = valid.clone()
    previous: torch.Tensor | None = None
    final = torch.zeros_like(inputs.embedded)
    spent = torch.zeros((rows, width), dtype=torch.long, device=device)
    exit_cdf = torch.zeros((rows, width), dtype=torch.float32, device=device)
    remaining = torch.ones_like(exit_cdf)
    last = 0
    for loop in range(n_loops):
        last, count = loop, loop + 1
        if loop == 0 or torch.equal(looping, valid):  # every token loops: the plain pass
            order, live, before = None, valid, previous
            h = model.loop_state(model.loop(inputs, previous, loop))
        else:  # the tokens that stopped hold their last loop's keys in this loop's entries
            stopped = (valid & ~looping).nonzero(as_tuple=True)
            cache.copy_loop(loop - 1, [loop], slots[stopped[0]], start + stopped[1])
            counts = looping.sum(1)
            order = torch.sort((~looping).to(torch.int8), dim=1, stable=True).indices
            order = order[:, : int(counts.max())]  # each row's looping tokens first, in order
            live = torch.arange(order.size(1), device=device)[None] < counts[:, None]
            pos = start + order
            writer = TokenWrites(cache, slots, pos, live, start + width)
            looped = model.prepare(tokens.gather(1, order), plan=gathered_plan(pos, writer))
            before = _gather(previous, order)
            h = model.loop_state(model.loop(looped, before, loop))
        if gated:
            cdf, rest = update_exit_cdf(_gather(exit_cdf, order), _gather(remaining, order),
                                        model.exit_probability(h))
            exit_cdf, remaining = _scatter(exit_cdf, order, cdf), _scatter(remaining, order, rest)
        signals = LoopSignals(loop, h, before,
                              exit_cdf=_gather(exit_cdf, order) if gated else None)
        converged = rows_converged(signals, _gather(criteria, order), _gather(threshold, order),
                                   used)
        stop = live & ((converged & (count >= earliest)) | (count >= n_loops))
        previous = h if order is None else _scatter(previous, order, torch.where(
            live[..., None], h, before))
        final = _scatter(final, order, torch.where(stop[..., None], h, _gather(final, order)))
        spent = _scatter(spent, order, torch.where(stop, count, _gather(spent, order)))
        looping = _scatter(looping, order, _gather(looping, order) & ~stop)
        if not bool(looping.any()):
            break
    if last + 1 < n_loops:  # the loops no token ran: every token's keys of the last one
        cache.copy_loop(last, range(last + 1, n_loops), slots, slice(start, start + width))
    return final, spent


def _gather(t: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Rows' entries (R, W[, d]) at their positions `order` (R, T) (None: all, in order)."""
    if order is None:
        return t
    if t.dim() == 3:
        return t.gather(1, order[..., None].expand(-1, -1, t.size(-1)))
    return t.gather(1, order)


def _scatter(t: torch.Tensor, order: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """`t` (R, W[, d]) with `values` (R, T[, d]) at positions `order` (None: all of them)."""
    if order is None:
        return values
    if t.dim() == 3:
        return t.scatter(1, order[..., None].expand(-1, -1, t.size(-1)), values)
    return t.scatter(1, order, values)


__all__ = ["adaptive_prefill"]
