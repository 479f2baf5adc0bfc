"""The exit criteria of adaptive loops (docs/design.md#decoding, docs/public_models.md) as a
table: when a decoded token may stop looping. The decode engine (`AdaptiveLoops` in
`loopedlm.infer.engine`) computes the signals a step's criteria need after every loop
(`LoopSignals`) and asks `rows_converged`; adding a criterion is one entry in
`EXIT_CRITERIA` and its name in `loopedlm.infer.options.CRITERIA`.

- `state`: relative change of the loop state, ||h^t - h^{t-1}|| / ||h^t|| < threshold. Free
  (h^t is computed anyway). On Huginn, whose state is the raw recurrent latent, this is its
  published "latent-diff" criterion.
- `kl`: KL(p_t || p_{t-1}) < threshold (nats) between successive loops' next-token
  distributions; one LM-head evaluation per loop.
- `kl_previous`: Huginn's published "kl" criterion, KL(p_{t-1} || p_t) < threshold, where
  p_0 is uniform (so it may stop after the first loop); one read-out per loop (Huginn's
  read-out runs its coda).
- `gate`: Ouro's published rule: exit probabilities p_t = lambda_t * prod_{j<t}(1 -
  lambda_j) from the model's exit gate lambda_t = sigmoid(gate(h^t)); stop once their sum
  (the cumulative exit probability) reaches the threshold q. Only for models with an exit
  gate; it may stop after the first loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loopedlm.infer.options import CRITERIA


@dataclass
class LoopSignals:
    """What the criteria read after loop `loop` (0-based), for the rows still looping, at
    the decoded position: the state h^t and h^{t-1} (rows, d); log-probabilities of loops t
    and t-1 (rows, V) when a criterion needs logits; the cumulative exit probability
    through loop t (rows,) for gated models. Entries of loop t-1 are None in the first loop."""

    loop: int
    state: torch.Tensor
    previous: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    previous_logp: torch.Tensor | None = None
    exit_cdf: torch.Tensor | None = None


@dataclass(frozen=True)
class ExitCriterion:
    """One criterion: `converged(signals, threshold)` -> bool (rows,), asked from loop
    `first_loop` (1-based) on. `needs_logits`: the LM head runs at every loop (costly);
    `needs_gate`: the model's exit gate (`LoopedGPT.exit_probability`)."""

    converged: Callable[[LoopSignals, torch.Tensor], torch.Tensor]
    first_loop: int = 2
    needs_logits: bool = False
    needs_gate: bool = False


def relative_change(state: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||h^t - h^{t-1}|| / ||h^t|| per row (the `state` criterion's signal), in fp32."""
    return (state - previous).float().norm(dim=-1) / state.float().norm(dim=-1)


def _relative_change(s: LoopSignals, threshold: torch.Tensor) -> torch.Tensor:
    return relative_change(s.state, s.previous) < threshold


def _kl_to_previous(s: LoopSignals, threshold: torch.Tensor) -> torch.Tensor:
    return (s.logp.exp() * (s.logp - s.previous_logp)).sum(-1) < threshold


def _kl_from_previous(s: LoopSignals, threshold: torch.Tensor) -> torch.Tensor:
    previous = s.previous_logp
    if previous is None:  # Huginn starts from the uniform distribution
        previous = torch.full_like(s.logp, -math.log(s.logp.size(-1)))
    return (previous.exp() * (previous - s.logp)).sum(-1) < threshold


def _gate_reached(s: LoopSignals, threshold: torch.Tensor) -> torch.Tensor:
    return s.exit_cdf >= threshold


# one rule per name of loopedlm.infer.options.CRITERIA (the names' torch-free home)
EXIT_CRITERIA: dict[str, ExitCriterion] = {
    "state": ExitCriterion(_relative_change),
    "kl": ExitCriterion(_kl_to_previous, needs_logits=True),
    "kl_previous": ExitCriterion(_kl_from_previous, first_loop=1, needs_logits=True),
    "gate": ExitCriterion(_gate_reached, first_loop=1, needs_gate=True),
}

# the criteria a prompt may stop by (`AdaptiveLoops.prompt`): none that reads logits
PROMPT_CRITERIA = tuple(name for name, rule in EXIT_CRITERIA.items() if not rule.needs_logits)


def default_criterion(has_exit_gate: bool) -> str:
    """A model's criterion when none is asked for: its own published rule where it has one
    (the exit gate), else `state`."""
    return "gate" if has_exit_gate else "state"


def check_criterion(criterion: str, has_exit_gate: bool) -> None:
    """A ValueError naming a criterion this model cannot use."""
    if criterion not in EXIT_CRITERIA:
        raise ValueError(f"adaptive_criterion={criterion!r} is not allowed: choose one of "
                         f"{list(CRITERIA)}")
    if EXIT_CRITERIA[criterion].needs_gate and not has_exit_gate:
        raise ValueError(f"adaptive_criterion={criterion!r} is not allowed for this model: it "
                         f"has no exit gate (only Ouro's backbone has one); choose one of "
                         f"{[c for c in CRITERIA if not EXIT_CRITERIA[c].needs_gate]}")


def update_exit_cdf(cdf: torch.Tensor, remaining: torch.Tensor, exit_probability: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ouro's running exit distribution after one more loop whose gate gives
    `exit_probability` (lambda_t): (cdf + lambda_t * remaining, remaining * (1 - lambda_t)),
    in the order of their code (p_t first, then what is left)."""
    return cdf + exit_probability * remaining, remaining * (1 - exit_probability)


def rows_converged(signals: LoopSignals, criterion_ids: torch.Tensor, threshold: torch.Tensor,
                   used: Sequence[int]) -> torch.Tensor:
    """bool (rows,): each row's own criterion (`criterion_ids`: indices into `CRITERIA`; only
    those in `used` occur) says its state converged at this loop."""
    converged = torch.zeros_like(criterion_ids, dtype=torch.bool)
    for index in used:
        criterion = EXIT_CRITERIA[CRITERIA[index]]
        if signals.loop + 1 >= criterion.first_loop:
            converged |= (criterion_ids == index) & criterion.converged(signals, threshold)
    return converged


__all__ = ["LoopSignals", "ExitCriterion", "EXIT_CRITERIA", "PROMPT_CRITERIA", "default_criterion",
           "relative_change", "check_criterion", "update_exit_cdf", "rows_converged"]
