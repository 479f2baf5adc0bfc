"""`loopedlm report`: the paper's tables and figures from a sweep."""

from loopedlm.experiments.report import register

__all__ = ["register"]
