"""`loopedlm sweep`: a grid of training runs."""

from loopedlm.experiments.sweep import register

__all__ = ["register"]
