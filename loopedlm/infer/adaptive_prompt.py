"""Adaptive loops over a prompt (docs/design.md#decoding, `AdaptiveLoops.prompt`): each prompt
token stops looping by its exit criterion, as a decoded token does, in a prefill that runs
one pass per loop over the tokens still looping.

A prompt token at loop t attends over the keys of loop t at every earlier position. Fed one
at a time (`DecodeEngine.decode`, adaptive), an earlier token has written those keys if it
ran loop t, and otherwise its skipped loops hold the keys of its last loop. The prefill
gives each token exactly these keys: after every loop, the tokens that stopped there get
their keys copied into the loops they skip (`StaticKVCache.fill_skipped_loops`, as a
decoded token's), and a token's own trajectory (its embedding, its previous state) is its
own. So a prompt
prefilled this way leaves the cache, and the logits, that feeding it token by token leaves,
up to the rounding of batched arithmetic, and a row's result does not depend on the others
of its pass. While every token still loops the pass is the plain prefill's (same plan,
same writer: threshold 0 gives its bits); once some have stopped, only the looping tokens
are computed, gathered per row (padded to the row with the most) or as one flat sequence
over every row's keys, whichever costs less (`_choose`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from loopedlm.infer.cache import StaticKVCache, TokenWrites
from loopedlm.infer.exits import EXIT_CRITERIA, LoopSignals, rows_converged, update_exit_cdf
from loopedlm.infer.options import CRITERIA
from loopedlm.model.attention import AttentionPlan, Masks
from loopedlm.model.config import ModelConfig
from loopedlm.model.gpt import LoopedGPT, LoopInputs

# the plan of a pass whose queries sit at positions (R', T) over keys [0, n_keys), with its
# cache writer and, where given, its own masks (`DecodeEngine._plan`)
Planner = Callable[..., AttentionPlan]


def adaptive_prefill(model: LoopedGPT, cache: StaticKVCache, slots: torch.Tensor,
                     inputs: LoopInputs, lengths: Sequence[int], start: int, n_loops: int,
                     settings: Sequence[Any], plan: Planner,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the prompts of rows `slots` (R,) adaptively, right-padded to a width W, at
    positions start .. start + W - 1. `inputs`: the plain prefill's (`LoopedGPT.prepare` under
    its plan and cache writer): its plan serves the loops that every token runs, and the
    later passes take their tokens' embeddings and first-layer keys from it; `lengths`:
    each row's real tokens; `settings`: each row's resolved `AdaptiveLoops` (criterion
    `state` or `gate`, min_loops set); a token runs at most `n_loops` loops. `plan(pos,
    n_keys, cache=, masks=)`: the engine's pass plan (`DecodeEngine._plan`).

    Returns the state each token stopped with (R, W, d) and the loops it ran (R, W) (past a
    row's end: zeros). A few host syncs per loop (which tokens still loop, and where)."""
    rows, width = inputs.embedded.shape[:2]
    device = inputs.embedded.device
    n_keys = start + width
    valid = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    threshold = torch.tensor([s.threshold for s in settings], dtype=torch.float32,
                             device=device)[:, None].expand(rows, width)
    criteria = torch.tensor([CRITERIA.index(s.criterion) for s in settings],
                            device=device)[:, None].expand(rows, width)
    earliest = torch.tensor([s.min_loops for s in settings], device=device)[:, None].expand(
        rows, width)
    used = sorted({CRITERIA.index(s.criterion) for s in settings})
    gated = any(EXIT_CRITERIA[s.criterion].needs_gate for s in settings)
    looping = valid.clone()
    previous: torch.Tensor | None = None
    final = torch.zeros_like(inputs.embedded)
    spent = torch.zeros((rows, width), dtype=torch.long, device=device)
    exit_cdf = torch.zeros((rows, width), dtype=torch.float32, device=device)
    remaining = torch.ones_like(exit_cdf)
    for loop in range(n_loops):
        count = loop + 1
        if loop == 0 or torch.equal(looping, valid):  # every token loops: the plain pass
            pick: _Pick = _All(valid)
            before = previous
            h = model.loop_state(model.loop(inputs, previous, loop))
        else:  # the looping tokens only
            pick = _choose(looping, model.config.d_model, n_keys)
            pos = start + pick.positions
            writer = TokenWrites(cache, slots, pick.rows, pos, pick.live, n_keys,
                                 flat=isinstance(pick, _Flat))
            before = pick.take(previous)
            h = model.loop_state(model.loop(pick.inputs(inputs, pick.plan(
                plan, model.config, pos, n_keys, writer)), before, loop))
        if gated:
            cdf, rest = update_exit_cdf(pick.take(exit_cdf), pick.take(remaining),
                                        model.exit_probability(h))
            exit_cdf, remaining = pick.put(exit_cdf, cdf), pick.put(remaining, rest)
        signals = LoopSignals(loop, h, before, exit_cdf=pick.take(exit_cdf) if gated else None)
        converged = rows_converged(signals, pick.take(criteria), pick.take(threshold), used)
        live = pick.live
        stop = live & ((converged & (count >= pick.take(earliest))) | (count >= n_loops))
        previous = h if previous is None or isinstance(pick, _All) else pick.put(
            previous, torch.where(live[..., None], h, before))
        final = pick.put(final, torch.where(stop[..., None], h, pick.take(final)))
        spent = pick.put(spent, torch.where(stop, count, pick.take(spent)))
        looping = pick.put(looping, pick.take(looping) & ~stop)
        # the tokens that stopped before n_loops: their skipped loops get this loop's keys
        early = pick.put(torch.zeros_like(looping), stop & (count < n_loops))
        at_row, at_column = early.nonzero(as_tuple=True)
        if at_row.numel():
            cache.fill_skipped_loops(torch.full_like(at_row, loop), start + at_column,
                                     rows=slots[at_row])
        if not bool(looping.any()):
            break
    return final, spent


class _Pick:
    """The tokens of a loop's pass, as a (R', T) layout over the prompt's (R, W) tokens:
    `take` gathers (R, W, ...) entries into it, `put` writes values of it back (out of
    place), `live` (R', T) marks the looping tokens among them, `rows` (R', T) and
    `positions` (R', T) say which row and column of the prompt each is."""

    live: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor

    def take(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def put(self, t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, plan: Planner, config: ModelConfig, pos: torch.Tensor, n_keys: int,
             writer: TokenWrites) -> AttentionPlan:
        return plan(pos, n_keys, cache=writer)

    def inputs(self, inputs: LoopInputs, plan: AttentionPlan) -> LoopInputs:
        """The prefill's loop inputs of these tokens, under the pass's `plan`: what
        `LoopedGPT.prepare` gave each (its embedding, its first layer's keys and values,
        which do not depend on the loop), taken, not computed again."""
        first_kv = None if inputs.first_kv is None else tuple(
            self.take(t.transpose(1, 2)).transpose(1, 2) for t in inputs.first_kv)
        initial = None if inputs.initial_state is None else self.take(inputs.initial_state)
        return LoopInputs(self.take(inputs.x0), self.take(inputs.embedded), plan, first_kv,
                          initial)


class _All(_Pick):
    """Every token, as the plain prefill's pass lays them out."""

    def __init__(self, valid: torch.Tensor):
        self.live = valid

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def put(self, t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values


class _Padded(_Pick):
    """Each row's looping tokens, in order, right-padded to the row with the most by tokens
    of its own that stopped (or lie past its end), which write nothing: attention stays per
    row, over that row's keys."""

    def __init__(self, looping: torch.Tensor, counts: torch.Tensor, most: int):
        order = torch.sort((~looping).to(torch.int8), dim=1, stable=True).indices[:, :most]
        self.order, self.positions = order, order
        self.live = torch.arange(most, device=order.device)[None] < counts[:, None]
        self.rows = torch.arange(order.size(0), device=order.device)[:, None].expand_as(order)

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        """`order` shaped to gather dim 1 of `t` (R, W, ...)."""
        order = self.order.view(*self.order.shape, *[1] * (t.dim() - 2))
        return order.expand(*self.order.shape, *t.shape[2:])

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, self._index(t))

    def put(self, t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return t.scatter(1, self._index(t), values)


class _Flat(_Pick):
    """Every looping token of every row as one sequence (1, n) whose queries attend over
    the keys of all rows side by side (R * n_keys), each masked to its own row's: no
    padding, at the price of attention scores over every row's keys."""

    def __init__(self, looping: torch.Tensor):
        rows, columns = looping.nonzero(as_tuple=True)
        self.index = (rows, columns)
        self.rows, self.positions = rows[None], columns[None]
        self.live = torch.ones_like(self.rows, dtype=torch.bool)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.index][None]

    def put(self, t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return t.index_put(self.index, values[0])

    def plan(self, plan: Planner, config: ModelConfig, pos: torch.Tensor, n_keys: int,
             writer: TokenWrites) -> AttentionPlan:
        return plan(pos, n_keys, cache=writer,
                    masks=self.masks(config, pos, n_keys, writer.slots.size(0), writer.cache.dtype))

    def masks(self, config: ModelConfig, pos: torch.Tensor, n_keys: int, n_rows: int,
              dtype: torch.dtype) -> Masks:
        """Additive masks (1, 1, n, n_rows * n_keys) per window size: a query sees its own
        row's keys at or before its position (and within the window)."""
        key_row = torch.arange(n_rows, device=pos.device).repeat_interleave(n_keys)
        key_pos = torch.arange(n_keys, device=pos.device).repeat(n_rows)
        q_row, q_pos = self.rows[0][:, None], pos[0][:, None]
        seen = (key_row[None] == q_row) & (key_pos[None] <= q_pos)
        masks: Masks = {}
        for window in set(config.window_sizes()):
            allowed = seen if window is None else seen & ((q_pos - key_pos[None]) < window)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=pos.device)
            masks[window] = (mask.masked_fill_(~allowed, float("-inf"))[None, None], False)
        return masks


def _choose(looping: torch.Tensor, d_model: int, n_keys: int) -> _Pick:
    """The cheaper layout of the looping tokens (R, W) for one loop: padded per row, or flat
    (`_Flat`) where its attention over every row's keys costs less than the padding's
    projections and MLPs (per token about 12 d multiply-adds per unit of d against 4 per
    key), and its mask stays small."""
    counts = looping.sum(1)
    n_rows, most, n = looping.size(0), int(counts.max()), int(counts.sum())
    flat = n * (12 * d_model + 4 * n_rows * n_keys)
    padded = n_rows * most * (12 * d_model + 4 * n_keys)
    if flat < padded and n * n_rows * n_keys <= FLAT_MASK_LIMIT:
        return _Flat(looping)
    return _Padded(looping, counts, most)


FLAT_MASK_LIMIT = 1 << 22  # mask entries of a flat pass (16 MiB in fp32)


__all__ = ["adaptive_prefill", "FLAT_MASK_LIMIT"]
