"""Variable-loop training (issue 14): the loop count N drawn per optimizer step.

`TrainConfig.loop_sampling` is one of

    "fixed"                       N = model.n_loops at every step (the paper; the default)
    "uniform:A,B"                 N uniform on the integers A..B (inclusive)
    "poisson_lognormal:MEAN[,SIGMA]"
                                  Huginn's sampler (Geiping et al. 2025, "Scaling up
                                  test-time compute with latent reasoning: a recurrent
                                  depth approach", and their code `randomized_iteration_
                                  sampler`): tau ~ Normal(log(r) - SIGMA^2/2, SIGMA),
                                  N = 1 + Poisson(exp(tau)), capped at `poisson_cap(MEAN)`.

Huginn's r is the mean of the Poisson rate, so its N has mean r + 1 (r = 32 there, with
SIGMA = 1/2). Here MEAN is the mean of N itself (before the cap): r = MEAN - 1, so
"poisson_lognormal:6" trains at 6 loops on average (MEAN = 1 gives N = 1 always).
SIGMA defaults to Huginn's 0.5. The draw is heavy-tailed (a log-normal mixture of
Poissons), so N is clamped at `poisson_cap(MEAN)` = max(2, ceil(3 * MEAN)) loops;
the clamp moves the tail's mass (about 1% at MEAN = 6) onto the cap, and
`distribution()` and `expected_loops()` include it exactly.

The draw at a step is a pure function of (seed, step), from its own numpy Generator:
every DDP rank draws the same N without communicating, and a resumed run draws the
same Ns as an uninterrupted one with no state in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from loopedlm.common.validation import not_allowed

KINDS = ("fixed", "uniform", "poisson_lognormal")
HUGINN_SIGMA = 0.5
FORMAT = "'fixed', 'uniform:A,B' (integers 1 <= A <= B) or 'poisson_lognormal:MEAN[,SIGMA]' " \
         "(MEAN >= 1, SIGMA > 0)"
# separates this stream from any other use of the run's seed
_STREAM = 0x100B5


def poisson_cap(mean: float) -> int:
    """The largest N the Poisson log-normal sampler returns (its draws are clamped here)."""
    return max(2, math.ceil(3 * mean))


@dataclass(frozen=True)
class LoopSampling:
    """A parsed `loop_sampling` value; `sample(seed, step)` is the N of that step."""

    kind: str
    fixed_loops: int = 0  # "fixed": the model's n_loops
    low: int = 0  # "uniform"
    high: int = 0
    mean: float = 0.0  # "poisson_lognormal"
    sigma: float = HUGINN_SIGMA

    @classmethod
    def parse(cls, text: str, n_loops: int) -> LoopSampling:
        """`text` as in the module docstring; `n_loops` is the model's (used by "fixed").
        Raises ConfigError naming the value and the allowed forms."""
        if not isinstance(text, str):
            raise not_allowed("loop_sampling", text, FORMAT)
        kind, colon, args = text.strip().partition(":")
        if kind == "fixed" and not colon:
            return cls("fixed", fixed_loops=n_loops)
        parts = [p.strip() for p in args.split(",")] if colon else []
        if kind == "uniform" and len(parts) == 2:
            try:
                low, high = int(parts[0]), int(parts[1])
            except ValueError:
                raise not_allowed("loop_sampling", text,
                                  "'uniform:A,B' needs integer A and B") from None
            if low < 1:
                raise not_allowed("loop_sampling", text, f"A={low} must be >= 1")
            if low > high:
                raise not_allowed("loop_sampling", text,
                                  f"A={low} > B={high} (the range is A..B, A <= B)")
            return cls("uniform", low=low, high=high)
        if kind == "poisson_lognormal" and len(parts) in (1, 2):
            try:
                mean = float(parts[0])
                sigma = float(parts[1]) if len(parts) == 2 else HUGINN_SIGMA
            except ValueError:
                raise not_allowed("loop_sampling", text,
                                  "'poisson_lognormal:MEAN[,SIGMA]' needs numbers") from None
            if not (math.isfinite(mean) and mean >= 1):
                raise not_allowed("loop_sampling", text,
                                  f"MEAN={parts[0]} must be >= 1 (the mean loop count)")
            if not (math.isfinite(sigma) and sigma > 0):
                raise not_allowed("loop_sampling", text, f"SIGMA={parts[1]} must be > 0")
            return cls("poisson_lognormal", mean=mean, sigma=sigma)
        raise not_allowed("loop_sampling", text, FORMAT)

    @property
    def variable(self) -> bool:
        return self.kind != "fixed"

    @property
    def max_loops(self) -> int:
        """The largest N this sampler can return."""
        if self.kind == "fixed":
            return self.fixed_loops
        if self.kind == "uniform":
            return self.high
        return poisson_cap(self.mean)

    def sample(self, seed: int, step: int) -> int:
        """N at optimizer step `step` (0-based) of a run seeded `seed`."""
        if self.kind == "fixed":
            return self.fixed_loops
        rng = np.random.default_rng([_STREAM, seed, step])
        if self.kind == "uniform":
            return int(rng.integers(self.low, self.high + 1))
        if self.mean == 1:
            return 1
        mu = math.log(self.mean - 1) - self.sigma**2 / 2
        rate = rng.lognormal(mu, self.sigma)
        return int(min(1 + rng.poisson(rate), self.max_loops))

    def distribution(self) -> dict[int, float]:
        """{N: probability} (exact for fixed and uniform; for the Poisson log-normal, the
        Poisson pmf integrated over tau by 96-point Gauss-Hermite quadrature, with the tail
        beyond the cap on the cap)."""
        if self.kind == "fixed":
            return {self.fixed_loops: 1.0}
        if self.kind == "uniform":
            width = self.high - self.low + 1
            return {n: 1.0 / width for n in range(self.low, self.high + 1)}
        if self.mean == 1:
            return {1: 1.0}
        nodes, weights = np.polynomial.hermite_e.hermegauss(96)
        weights = weights / weights.sum()
        rates = np.exp(math.log(self.mean - 1) - self.sigma**2 / 2 + self.sigma * nodes)
        cap = self.max_loops
        probs, pmf = {}, np.exp(-rates)  # Poisson pmf at k = 0 for every node
        for k in range(cap - 1):  # N = k + 1 for k = 0 .. cap - 2
            probs[k + 1] = float(weights @ pmf)
            pmf = pmf * rates / (k + 1)
        probs[cap] = max(0.0, 1.0 - sum(probs.values()))
        return probs

    def expected_loops(self) -> float:
        return sum(n * p for n, p in self.distribution().items())

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed N={self.fixed_loops}"
        if self.kind == "uniform":
            return f"N uniform on {self.low}..{self.high}"
        return (f"N = 1 + Poisson(exp(tau)), tau ~ Normal(log({self.mean:g} - 1) - "
                f"{self.sigma:g}^2/2, {self.sigma:g}), capped at {self.max_loops}")


__all__ = ["LoopSampling", "poisson_cap", "KINDS", "HUGINN_SIGMA"]
