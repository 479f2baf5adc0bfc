"""`loopedlm data ...`: prepare and fetch corpora."""

from loopedlm.data.loader import register

__all__ = ["register"]
