"""`loopedlm serve`: the OpenAI-compatible server."""

from loopedlm.infer.command import register

__all__ = ["register"]
