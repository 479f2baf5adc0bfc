"""`loopedlm info`, `loopedlm import-nanochat`."""

from loopedlm.experiments.info import register

__all__ = ["register"]
