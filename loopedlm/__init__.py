"""loopedlm: train, evaluate and serve looped transformer language models."""

from loopedlm.attention import KVCache
from loopedlm.config import ConfigError, ModelConfig
from loopedlm.loop_modes import LOOP_MODES, LoopMode
from loopedlm.model import LoopedGPT

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ConfigError", "LoopedGPT", "LoopMode", "LOOP_MODES", "KVCache",
           "__version__"]
