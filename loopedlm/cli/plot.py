"""`loopedlm plot`: stability figures of runs."""

from loopedlm.experiments.plot import register

__all__ = ["register"]
