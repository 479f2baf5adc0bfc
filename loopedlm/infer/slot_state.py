"""The decode engine's per-slot state (`loopedlm.infer.engine.DecodeEngine` is a
`SlotState`): what the host knows of each open slot (`SlotInfo`), and device tensors with
one row per slot that are the fixed-shape step's static inputs and outputs, updated in
place, so that a step captured as a CUDA graph reads and writes the same memory on every
replay. `record` is how a sampled token moves a row on."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from loopedlm.infer.options import AdaptiveLoops
from loopedlm.infer.sampling import SamplingParams


@dataclass
class SlotInfo:
    n_loops: int
    filtered: bool                      # uses top-k or top-p
    greedy: bool                        # temperature 0
    adaptive: AdaptiveLoops | None
    length: int                         # tokens in the cache (an upper bound once finished)


class SlotState:
    """Rows 0 .. max_batch-1, one per slot; `_slots` maps each open slot to its info."""

    def __init__(self, max_batch: int, max_len: int, vocab_size: int,
                 device: torch.device):
        self.max_batch, self.max_len, self.device = max_batch, max_len, device
        self.vocab_size = vocab_size

        def state(dtype, fill=0):
            return torch.full((max_batch,), fill, dtype=dtype, device=device)
        # the step's static inputs, updated in place by the step itself
        self.tokens = state(torch.long)           # the token to feed next
        self.pos = state(torch.long)              # the position it is written at
        self.counter = state(torch.long)          # tokens sampled so far
        self.max_new = state(torch.long, 1)
        self.row_loops = state(torch.long, 1)
        self.temperature = state(torch.float32, 1.0)
        self.top_k = state(torch.long, vocab_size)
        self.top_p = state(torch.float32, 1.0)
        self.seed = state(torch.long)
        self.active = state(torch.bool, False)
        self.finished = state(torch.bool, False)
        self.stop_table = torch.full((max_batch, 1), -1, dtype=torch.long, device=device)
        # the step's static outputs
        self.out_tokens = state(torch.long, -1)
        self.out_loops = state(torch.long)
        self._slots: dict[int, SlotInfo] = {}

    def open_slot(self, slot: int, n_loops: int, adaptive: AdaptiveLoops | None) -> None:
        """Open `slot` at `n_loops`: greedy, no stop ids, a budget of the whole cache."""
        self._slots[slot] = SlotInfo(n_loops, False, True, adaptive, 0)
        self.row_loops[slot] = n_loops
        self.temperature[slot] = 0.0
        self.top_k[slot] = self.vocab_size
        self.top_p[slot] = 1.0
        self.max_new[slot] = self.max_len
        self.stop_table[slot] = -1
        self.counter[slot] = 0
        self.finished[slot] = False
        self.active[slot] = True

    def set_sampling(self, slot: int, sampling: SamplingParams, max_new_tokens: int | None,
                     stops: list[int]) -> bool:
        """Store an open slot's sampling settings, token budget and stop ids. Returns
        whether the stop table grew (a new shape: captured steps no longer fit)."""
        self._slots[slot].filtered = sampling.top_k is not None or sampling.top_p < 1
        self._slots[slot].greedy = sampling.temperature == 0
        self.temperature[slot] = float(sampling.temperature)
        if sampling.top_k is not None:
            self.top_k[slot] = min(sampling.top_k, self.vocab_size)
        self.top_p[slot] = float(sampling.top_p)
        self.seed[slot] = random.getrandbits(62) if sampling.seed is None else sampling.seed
        if max_new_tokens is not None:
            self.max_new[slot] = max_new_tokens
        grew = len(stops) > self.stop_table.size(1)
        if grew:  # rarely
            wider = torch.full((self.max_batch, len(stops)), -1, dtype=torch.long,
                               device=self.device)
            wider[:, : self.stop_table.size(1)] = self.stop_table
            self.stop_table = wider
        if stops:
            self.stop_table[slot, : len(stops)] = torch.tensor(stops, device=self.device)
        return grew

    def record(self, rows: slice, sampled: torch.Tensor, live: torch.Tensor,
               loops: torch.Tensor, *, advance: bool = True) -> None:
        """Store the tokens `rows` sampled (those `live`), move their position past the
        token just fed (`advance`; not after a prefill), and flag the finished ones."""
        pos = self.pos[rows] + live.long() if advance else self.pos[rows]
        counter = self.counter[rows] + live.long()
        stop = (sampled[:, None] == self.stop_table[rows]).any(1)
        done = stop | (counter >= self.max_new[rows]) | (pos >= self.max_len)
        self.out_tokens[rows] = torch.where(live, sampled, -1)
        self.out_loops[rows] = loops
        self.tokens[rows] = torch.where(live, sampled, self.tokens[rows])
        # a row that filled the cache is finished; it keeps computing (masked) in place
        self.pos[rows] = pos.clamp_max(self.max_len - 1)
        self.counter[rows] = counter
        self.finished[rows] = self.finished[rows] | (live & done)

    def step_state(self) -> list[torch.Tensor]:
        """The tensors a step changes (what a capture's warm-up must put back)."""
        return [self.tokens, self.pos, self.counter, self.finished, self.out_tokens,
                self.out_loops]


__all__ = ["SlotInfo", "SlotState"]
