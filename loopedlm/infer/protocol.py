"""The contract between the scheduler and a decode engine.

The scheduler (`loopedlm.infer.scheduler`) owns requests: the queue, admission,
timeouts, cancellation and text. A decode engine owns the model and the batch: it holds
up to `capacity` sequences, each in a slot the scheduler names, and advances all of them
by one token per `step`. Any engine with these methods can serve; `EngineSlots`
(`loopedlm.infer.slots`) is the one over the static-cache `DecodeEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SequenceParams:
    """How one sequence is decoded: its loop budget and its sampling.

    n_loops: loops per token. adaptive_threshold: stop looping a token once its loop
    state changes less than this (`loopedlm.infer.options.AdaptiveLoops`, criterion "state";
    n_loops is then the most a token may use). temperature (0 = greedy), top_p in (0, 1],
    seed (None: a fresh random seed).
    """

    n_loops: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    adaptive_threshold: float | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of the sequence in `slot`, and the loops spent computing it."""

    slot: int
    token: int
    loops: int


class SlotEngine(Protocol):
    """What the scheduler needs from an engine. Calls come from one thread."""

    @property
    def capacity(self) -> int:
        """Most sequences held at once (slots are 0 .. capacity - 1)."""
        ...

    @property
    def context_len(self) -> int:
        """Most tokens (prompt + fed-back tokens) one sequence may hold."""
        ...

    def add(self, slot: int, prompt: list[int], params: SequenceParams) -> TokenEvent:
        """Start a sequence in a free `slot`: prefill `prompt`, sample its first token."""
        ...

    def step(self) -> list[TokenEvent]:
        """Feed every held sequence its last sampled token; sample one more for each."""
        ...

    def release(self, slot: int) -> None:
        """Forget the sequence in `slot`; the slot is free again."""
        ...
