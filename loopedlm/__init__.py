"""loopedlm: train, evaluate and serve looped transformer language models.

Subpackages, bottom to top (each imports only from those before it):
`common` -> `model` -> `data` -> `infer` -> `evaluate` -> `train` -> `experiments` ->
`cli`. `tests/test_architecture.py` checks that order."""

from loopedlm.common.validation import ConfigError
from loopedlm.model import LOOP_MODES, LoopedGPT, LoopMode, ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ConfigError", "LoopedGPT", "LoopMode", "LOOP_MODES", "__version__"]
