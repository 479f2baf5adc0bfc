"""`loopedlm eval`, `loopedlm tasks`, `loopedlm lm-eval`: evaluation."""

from loopedlm.evaluate.cli import register

__all__ = ["register"]
