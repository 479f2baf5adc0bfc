"""The model (docs/design.md#backbone): `config` (ModelConfig), `loop_modes` (the one table
of loop modes), `attention` (attention, the attention plan and the one mask builder; a
decoding pass brings its KV cache as a `CacheWriter`), `gpt` (LoopedGPT and its per-loop
API), `head_loss` (the fused, chunked LM-head loss), `checkpoint` (model and run folders on
disk) and `interop` (the authors' nanochat checkpoints).
Nothing here imports from any other loopedlm subpackage except `loopedlm.common`.
The names below are imported on first use (`loopedlm.common.lazy`): `model.config` needs
no torch."""

from typing import TYPE_CHECKING

from loopedlm.common.lazy import lazy_exports

if TYPE_CHECKING:
    from loopedlm.model.config import ModelConfig
    from loopedlm.model.gpt import LoopedGPT
    from loopedlm.model.loop_modes import LOOP_MODES, LoopMode

__all__ = ["ModelConfig", "LoopedGPT", "LoopMode", "LOOP_MODES"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "ModelConfig": "config", "LoopedGPT": "gpt", "LOOP_MODES": "loop_modes",
    "LoopMode": "loop_modes"})
