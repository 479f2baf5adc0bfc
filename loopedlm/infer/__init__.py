"""Inference (docs/design.md#decoding).

Decoding: the decode engine (`engine`: slots, the fixed-shape step and its CUDA graphs, the
per-row options `SequenceParams` and `AdaptiveLoops`), its static KV cache (`cache`),
device-side sampling (`sampling`), and the public entry points `generate`, `stream` and
`decode_nll` (`generate`).
Serving: `loopedlm serve`, an OpenAI-compatible HTTP server (`server`: the app, its schema,
errors and metrics) whose scheduler (`scheduler`: queue, admission, timeouts, cancellation,
text) drives the engine directly."""

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
