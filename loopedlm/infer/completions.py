"""One POST /v1/completions request of `loopedlm serve`, once its sequences exist: it
submits them to the scheduler, gathers the deltas the scheduler sends back (from its own
thread), and answers as server-sent events (`stream: true`, ending in `data: [DONE]`) or
as one JSON body. A client that goes away cancels its unfinished sequences, which frees
their slots at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loopedlm.infer.api import ApiError, CompletionRequest
from loopedlm.infer.scheduler import Delta, QueueFull, Scheduler, Sequence

DISCONNECT_POLL = 0.25  # seconds between checks that a non-streaming client is still there


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def finish_fields(sequence: Sequence) -> dict[str, Any]:
    """What a choice reports once its sequence has finished."""
    return {"mean_loops": _mean(sequence.loops)}


class Completion:
    """The answer to `body` (model `model_name`), whose sequences `scheduler` decodes.
    Create it inside the request's event loop; `sink_for(i)` is sequence i's sink."""

    def __init__(self, body: CompletionRequest, model_name: str, scheduler: Scheduler):
        self.body, self.model_name, self.scheduler = body, model_name, scheduler
        self.loop = asyncio.get_running_loop()
        self.deltas: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.head: dict[str, Any] = {}

    def sink_for(self, index: int) -> Callable[[Delta], None]:
        return lambda delta: self.loop.call_soon_threadsafe(self.deltas.put_nowait,
                                                            (index, delta))

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue `sequences` (made with this completion's sinks); 429 when the queue is full."""
        try:
            self.scheduler.submit(sequences)
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full") from None
        self.sequences = sequences
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                     "created": int(time.time()), "model": self.model_name}

    def usage(self) -> dict[str, int]:
        prompt = sum(len(s.prompt) for s in self.sequences)
        completion = sum(len(s.tokens) for s in self.sequences)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def cancel_unfinished(self) -> None:
        for sequence in self.sequences:
            if sequence.finish_reason is None:
                self.scheduler.cancel(sequence)

    # ---- streaming: server-sent events ------------------------------------------------------
    def event_stream(self) -> StreamingResponse:
        return StreamingResponse(self.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def events(self) -> AsyncIterator[str]:
        """One event per delta, then the usage (when asked) and `[DONE]`."""
        include_usage = bool((self.body.stream_options or {}).get("include_usage"))
        open_ = set(range(len(self.sequences)))
        try:
            while open_:
                index, delta = await self.deltas.get()
                if delta.finish_reason is not None:
                    open_.discard(index)
                event = {**self.head, "choices": [self.delta_choice(index, delta)]}
                yield f"data: {json.dumps(event)}\n\n"
            if include_usage:
                yield f"data: {json.dumps({**self.head, 'choices': [], 'usage': self.usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: free the slots now
            self.cancel_unfinished()

    def delta_choice(self, index: int, delta: Delta) -> dict[str, Any]:
        choice = {"index": index, "text": delta.text, "logprobs": None,
                  "finish_reason": delta.finish_reason}
        if self.body.return_loops:
            choice["loops"] = delta.loops
        if delta.finish_reason is not None:
            choice.update(finish_fields(self.sequences[index]))
        return choice

    # ---- one JSON body -------------------------------------------------------------------------
    async def collect(self, request: Request) -> Response:
        """The whole answer as JSON once every sequence has finished; 499 (nobody to
        answer) when the client went away, 500 when generation failed."""
        texts: list[list[str]] = [[] for _ in self.sequences]
        open_ = set(range(len(self.sequences)))
        check_at = self.loop.time() + DISCONNECT_POLL
        try:
            while open_:
                with contextlib.suppress(TimeoutError):
                    index, delta = await asyncio.wait_for(self.deltas.get(),
                                                          timeout=DISCONNECT_POLL)
                    texts[index].append(delta.text)
                    if delta.finish_reason is not None:
                        open_.discard(index)
                if self.loop.time() >= check_at:  # nobody to answer: stop generating for them
                    check_at = self.loop.time() + DISCONNECT_POLL
                    if await request.is_disconnected():
                        return Response(status_code=499)
        finally:
            self.cancel_unfinished()
        if any(s.finish_reason == "error" for s in self.sequences):
            raise ApiError(500, "generation failed on the server (see its log)", kind="server_error")
        return JSONResponse({**self.head, "choices": self.choices(texts), "usage": self.usage()})

    def choices(self, texts: list[list[str]]) -> list[dict[str, Any]]:
        choices = []
        for index, sequence in enumerate(self.sequences):
            choice = {"index": index, "text": "".join(texts[index]), "logprobs": None,
                      "finish_reason": sequence.finish_reason, **finish_fields(sequence)}
            if self.body.return_loops:
                choice["loops"] = list(sequence.loops)
            choices.append(choice)
        return choices


__all__ = ["Completion", "finish_fields", "DISCONNECT_POLL"]
