"""Inference (docs/design.md#decoding).

Decoding: the decode engine (`engine`: slots, the fixed-shape step and its CUDA graphs, the
per-row options `SequenceParams` and `AdaptiveLoops`), its static KV cache (`cache`),
device-side sampling (`sampling`), and the public entry points `generate`, `stream` and
`decode_nll` (`generate`).
Serving: `loopedlm serve`, an OpenAI-compatible HTTP server (`server`: the app, its schema,
errors and metrics) whose scheduler (`scheduler`: queue, admission, timeouts, cancellation,
text) drives the engine directly.
The names below are imported on first use (`loopedlm.common.lazy`)."""

from typing import TYPE_CHECKING

from loopedlm.common.lazy import lazy_exports

if TYPE_CHECKING:
    from loopedlm.infer.cache import StaticKVCache, loop_slot_map
    from loopedlm.infer.engine import (
        AdaptiveLoops,
        DecodeEngine,
        SequenceParams,
        StepOutput,
        batch_buckets,
    )
    from loopedlm.infer.sampling import SamplingParams, sample_rows

__all__ = ["DecodeEngine", "SequenceParams", "StaticKVCache", "StepOutput", "batch_buckets",
           "AdaptiveLoops", "loop_slot_map", "SamplingParams", "sample_rows"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "DecodeEngine": "engine", "SequenceParams": "engine", "StepOutput": "engine",
    "batch_buckets": "engine", "AdaptiveLoops": "engine", "StaticKVCache": "cache",
    "loop_slot_map": "cache", "SamplingParams": "sampling", "sample_rows": "sampling"})
