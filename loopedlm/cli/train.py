"""`loopedlm train`: a training run from a recipe and --key=value settings."""

from loopedlm.train.trainer import register

__all__ = ["register"]
