"""loopedlm: train, evaluate and serve looped transformer language models.

Subpackages, bottom to top (each imports only from those before it):
`common` -> `model` -> `data` -> `infer` -> `evaluate` -> `train` -> `experiments` ->
`cli`. `tests/test_architecture.py` checks that order.

The model names are imported on first use (`loopedlm.common.lazy`), so that importing any
part of loopedlm does not import torch before it is needed."""

from typing import TYPE_CHECKING

import loopedlm.common.paths  # noqa: F401  (reads the user's TORCHINDUCTOR_CACHE_DIR first)
from loopedlm.common.lazy import lazy_exports
from loopedlm.common.validation import ConfigError

if TYPE_CHECKING:
    from loopedlm.model import LOOP_MODES, LoopedGPT, LoopMode, ModelConfig

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ConfigError", "LoopedGPT", "LoopMode", "LOOP_MODES", "__version__"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "ModelConfig": "model", "LoopedGPT": "model", "LoopMode": "model", "LOOP_MODES": "model"})
