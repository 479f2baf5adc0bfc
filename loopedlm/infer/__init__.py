"""Inference.

Decoding: the static-cache decode engine (`engine`, over `slot_state`, `static_cache`,
`cached_forward` and `graphs`), device-side sampling (`sampling`) and decoding options
(`options`: adaptive loops, shared cache slots); `loopedlm.infer.generate` is the public
entry point, `scoring` scores text through the decoding path, and `reference` is the
model's own cached forward that the engine is tested against.
Serving: `loopedlm serve` (an OpenAI-compatible HTTP server, `loopedlm.infer.server`, with
its `api`, `completions` and `metrics`), its scheduler (queue, admission, timeouts,
cancellation, streaming) and the engine adapter it drives through the small protocol of
`loopedlm.infer.protocol`.
The names below are imported on first use (`loopedlm.common.lazy`)."""

from typing import TYPE_CHECKING

from loopedlm.common.lazy import lazy_exports

if TYPE_CHECKING:
    from loopedlm.infer.engine import DecodeEngine, StepOutput
    from loopedlm.infer.graphs import batch_buckets
    from loopedlm.infer.options import AdaptiveLoops, loop_slot_map
    from loopedlm.infer.sampling import SamplingParams, sample_rows
    from loopedlm.infer.static_cache import StaticKVCache

__all__ = ["DecodeEngine", "StaticKVCache", "StepOutput", "batch_buckets", "AdaptiveLoops",
           "loop_slot_map", "SamplingParams", "sample_rows"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "DecodeEngine": "engine", "StepOutput": "engine", "batch_buckets": "graphs",
    "AdaptiveLoops": "options", "loop_slot_map": "options", "SamplingParams": "sampling",
    "sample_rows": "sampling", "StaticKVCache": "static_cache"})
