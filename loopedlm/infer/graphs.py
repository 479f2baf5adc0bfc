"""Static shapes for the decode step: the batch buckets a step runs at, and the CUDA-graph
capture of a stateful step (one graph per bucket and step key, replayed every step)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a step runs at: powers of two below `max_batch`, then `max_batch`."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch]


def capture_step(body: Callable[[], None], state: list[torch.Tensor],
                 device: torch.device) -> Callable[[], None]:
    """CUDA-graph capture of a step `body` that updates the tensors `state` in place: warm
    up (which advances the state), put the state back, then record. Keys/values the warm-up
    wrote lie at or after each row's position, so the real steps rewrite them before any
    query can read them. Off CUDA the same procedure runs and the 'replay' is a plain call
    (tested on CPU)."""
    saved = [t.clone() for t in state]
    on_cuda = device.type == "cuda"
    stream = torch.cuda.Stream() if on_cuda else None
    if on_cuda:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
    else:
        for _ in range(2):
            body()
    for tensor, value in zip(state, saved, strict=True):
        tensor.copy_(value)
    if not on_cuda:
        return body
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


__all__ = ["batch_buckets", "capture_step"]
