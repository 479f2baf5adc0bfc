"""`EngineSlots`: the scheduler's `SlotEngine` protocol over the static-cache
`DecodeEngine` (loopedlm.infer.engine), which already has one slot per sequence, per-row
loop counts in one step and device-side sampling; this only converts its options and
brings each step's tokens to the host in one transfer."""

from __future__ import annotations

import torch

from loopedlm.infer.engine import DecodeEngine
from loopedlm.infer.options import AdaptiveLoops
from loopedlm.infer.protocol import SequenceParams, TokenEvent
from loopedlm.infer.sampling import SamplingParams
from loopedlm.model.gpt import LoopedGPT


class EngineSlots:
    """A `SlotEngine` for one `LoopedGPT`: `capacity` slots, n_loops up to `max_loops`;
    other keyword arguments go to `DecodeEngine` (dtype, graphs, compile, ...)."""

    def __init__(self, model: LoopedGPT, *, capacity: int, max_loops: int, **options):
        self.engine = DecodeEngine(model, max_batch=capacity, max_loops=max_loops, **options)

    @property
    def capacity(self) -> int:
        return self.engine.max_batch

    @property
    def context_len(self) -> int:
        return self.engine.max_len

    def add(self, slot: int, prompt: list[int], params: SequenceParams) -> TokenEvent:
        adaptive = None if params.adaptive_threshold is None \
            else AdaptiveLoops(params.adaptive_threshold)
        sampling = SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                  seed=params.seed)
        first = self.engine.add(slot, prompt, n_loops=params.n_loops, sampling=sampling,
                                adaptive=adaptive)
        return TokenEvent(slot, int(first), params.n_loops)  # the prefill runs every loop

    def step(self) -> list[TokenEvent]:
        out = self.engine.step()
        tokens, loops = torch.stack([out.tokens, out.loops]).tolist()
        events = []
        for slot in self.engine.active_slots:
            if tokens[slot] < 0:  # the engine ended it (its cache is full): not expected here
                raise RuntimeError(f"slot {slot} produced no token (its cache is full)")
            events.append(TokenEvent(slot, tokens[slot], loops[slot]))
        return events

    def release(self, slot: int) -> None:
        self.engine.release(slot)


__all__ = ["EngineSlots"]
