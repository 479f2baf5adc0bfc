"""Decoding options shared by the engine and `loopedlm.infer.generate`: adaptive loops (a token
stops looping once its loop state has converged) and shared cache slots (the N loops share
K < N cache slots). Their rationale is in `loopedlm.infer.generate`'s docstring."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loopedlm.common.validation import is_int

CRITERIA = ("state", "kl")
SLOT_POLICIES = ("block", "modulo")


@dataclass(frozen=True)
class AdaptiveLoops:
    """Stop looping a decoded token once its loop state has converged.

    criterion "state" (default): relative change of the loop output,
        ||h^t - h^{t-1}|| / ||h^t|| < threshold. Free: h^t is computed anyway, and it is
        what the next loop reads, so a small change means the next loop would see the
        same input (the fixed-point argument in loopedlm.infer.generate).
    criterion "kl": KL(p_t || p_{t-1}) < threshold between successive loops' next-token
        distributions (nats). Closer to what the user sees, but it costs one LM-head
        evaluation per loop, which for small models is as large as a loop itself.
    min_loops: never stop before this many loops (>= 2: a change needs two loops).
    """

    threshold: float
    criterion: str = "state"
    min_loops: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, int | float) or math.isnan(self.threshold) \
                or self.threshold < 0:
            raise ValueError(f"adaptive_threshold={self.threshold!r} is not allowed: a number >= 0")
        if self.criterion not in CRITERIA:
            raise ValueError(f"adaptive_criterion={self.criterion!r} is not allowed: choose one "
                             f"of {list(CRITERIA)}")
        if not is_int(self.min_loops) or self.min_loops < 2:
            raise ValueError(f"min_loops={self.min_loops!r} is not allowed: an integer >= 2")


def loop_slot_map(n_loops: int, cache_slots: int | None = None,
                  policy: str = "block") -> list[int]:
    """The cache slot of each loop (0-based): the identity when `cache_slots` is None or
    >= n_loops (exact); otherwise `block` (floor(t*K/N)) or `modulo` (t mod K)."""
    if policy not in SLOT_POLICIES:
        raise ValueError(f"slot_policy={policy!r} is not allowed: choose one of "
                         f"{list(SLOT_POLICIES)}")
    if cache_slots is None or cache_slots >= n_loops:
        return list(range(n_loops))
    if not is_int(cache_slots) or cache_slots < 1:
        raise ValueError(f"cache_slots={cache_slots!r} is not allowed: an integer >= 1")
    if policy == "block":
        return [t * cache_slots // n_loops for t in range(n_loops)]
    return [t % cache_slots for t in range(n_loops)]


__all__ = ["AdaptiveLoops", "loop_slot_map", "CRITERIA", "SLOT_POLICIES"]
