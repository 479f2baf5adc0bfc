"""`loopedlm sample`: generate text from a run."""

from loopedlm.infer.generate import register

__all__ = ["register"]
