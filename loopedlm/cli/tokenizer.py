"""`loopedlm tokenizer ...`: train and inspect tokenizers."""

from loopedlm.data.tokenizer import register

__all__ = ["register"]
