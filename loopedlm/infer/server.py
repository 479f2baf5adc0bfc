"""`loopedlm serve`: an OpenAI-compatible HTTP server for a looped model, where every
request chooses its loop budget.

Endpoints (FastAPI + uvicorn):

* `POST /v1/completions`, as OpenAI's: `prompt` (a string, a list of strings, token ids,
  or a list of those), `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `stream`
  (server-sent events ending in `data: [DONE]`; `stream_options.include_usage`),
  `logprobs` (0 .. 5), `echo`, `usage`. Extra request fields: `n_loops` (loops per token,
  default the model's), `adaptive_threshold` (stop looping a token once its loop state
  changes less than this, or for Ouro once its exit gate's cumulative probability reaches
  it; n_loops is then the most it may use), `adaptive_criterion` (`state`, `kl`,
  `kl_previous`, `gate`; default the model's own), `adaptive_prompt` (the prompt's tokens
  stop by the same rule, `state` or `gate`; default false), `draft_loops` (self-speculative
  decoding: the model at this many loops drafts tokens that n_loops verifies; same output),
  `return_loops` (also list the loops spent on every token), `timeout` (seconds, at most
  the server's). Every choice reports `mean_loops` (and `loops` when asked). Finish
  reasons: "stop", "length", "timeout".
* `GET /v1/models`, `GET /health` (503 when the server cannot generate), `GET /metrics`
  (Prometheus text format).
* `GET /`: a web page to try prompts at any loop budget, each token shaded by the loops
  it used.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for
a bad request (invalid JSON, wrong types, values out of range, a field this server does not
implement set to anything but its neutral value, too many prompts, a prompt longer than the
context, max_tokens beyond it), 404 for an unknown model, 413 for a body over
`--max-body-bytes`, 429 when the queue is full, 500 when generation failed, 503 when the
decode worker is not running. A client that disconnects cancels its sequences, which frees
their slots at once.

Nothing a request does can hurt the next one (docs/serving.md): every field is checked
before any engine state is touched, prompts are tokenized off the event loop (so /health
and other streams never wait on a big prompt), and a failure inside the engine ends the
sequences that caused it (`loopedlm.infer.scheduler`).

This file is the HTTP side: the request schema and errors (`CompletionRequest`,
`ApiError`), one request's answer (`Completion`: streamed or one body), the Prometheus
metrics (`ServerMetrics`), the body-size limit (`BodyLimit`) and the app. The scheduler
(`loopedlm.infer.scheduler`) runs the decode engine (`loopedlm.infer.engine.DecodeEngine`)
on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from loopedlm.common.validation import is_int
from loopedlm.data.runs import load_run
from loopedlm.infer.engine import (
    MAX_LOGPROBS,
    AdaptiveLoops,
    DecodeEngine,
    SequenceParams,
    check_draft_loops,
)
from loopedlm.infer.options import DEFAULT_MAX_TOKENS
from loopedlm.infer.sampling import SamplingParams
from loopedlm.infer.scheduler import (
    Delta,
    QueueFull,
    Scheduler,
    Sequence,
    SlotEngine,
    TokenLogprob,
    Unavailable,
)
from loopedlm.infer.trace import DEFAULT_TOP_K, trace_loops
from loopedlm.model.config import check_token_ids

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # stop strings per request (OpenAI's 4), characters each


# ---- the API: request body and errors in OpenAI's shape ----------------------------------
class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (unknown fields are ignored, as OpenAI does). A new
    field: declare it here, check what depends on the server in `CompletionServer.check`,
    and pass it on in `CompletionServer.sequence_params`."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: Any = None
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    user: str | None = None  # (an end-user id: accepted, not used)
    # OpenAI fields this server does not implement: accepted at their neutral value only
    suffix: Any = None
    best_of: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    # loopedlm's own
    n_loops: int | None = Field(None, ge=1)
    adaptive_threshold: float | None = Field(None, ge=0)
    adaptive_criterion: str | None = None
    adaptive_prompt: bool = False
    draft_loops: int | None = Field(None, ge=1)
    return_loops: bool = False
    timeout: float | None = Field(None, gt=0)


# field -> the values that mean "not used" (anything else is a 400 naming the field)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""), "best_of": (None, 1), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "logit_bias": (None, {})}


class LoopTraceRequest(BaseModel):
    """The body of POST /v1/loop_trace (the web page's per-loop view of a completion)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    prompt: str | list[int]
    completion: str | list[int]
    n_loops: int | None = Field(None, ge=1)
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=50)


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        # (a message may quote the request: lone surrogates cannot be sent as UTF-8)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = \
            status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def preview(value: Any, limit: int = 60) -> str:
    """`value` as JSON, cut to `limit` characters, for a message (any depth, any size)."""
    def shallow(x: Any, depth: int) -> Any:
        if isinstance(x, list):
            return [shallow(v, depth + 1) for v in x[:4]] + (["..."] if len(x) > 4 else []) \
                if depth < 3 else "[...]"
        if isinstance(x, dict):
            items = list(x.items())[:4]
            return {str(k)[:20]: shallow(v, depth + 1) for k, v in items} if depth < 3 else "{...}"
        return x[:limit] if isinstance(x, str) else x
    text = json.dumps(shallow(value, 0), default=str)  # ensure_ascii: lone surrogates escaped
    return text if len(text) <= limit else text[:limit - 3] + "..."


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message (and the first bad field) for a body that failed validation."""
    parts, param = [], None
    for error in exc.errors()[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', '')})")
            continue
        where = preview(".".join(loc), 40).strip('"') if loc else "body"
        param = param or where
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {preview(got)})"
        parts.append(f"{where}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(parts) or "invalid request", param


def finite(value: float) -> float | None:
    """JSON has no infinities: a logprob of -inf is reported as null."""
    return value if math.isfinite(value) else None


# ---- one request's answer: server-sent events or one JSON body -----------------------------
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
        self.echoes: list[str] = []  # per sequence: the text to put before its completion
        self.head: dict[str, Any] = {}

    def sink_for(self, index: int) -> Callable[[Delta], None]:
        return lambda delta: self.loop.call_soon_threadsafe(self.deltas.put_nowait,
                                                            (index, delta))

    def submit(self, sequences: list[Sequence], echoes: list[str] | None = None) -> None:
        """Queue `sequences` (made with this completion's sinks), each answered after its
        `echoes` text (`echo`); 429 when the queue is full, 503 when nothing can run them."""
        try:
            self.scheduler.submit(sequences)
        except QueueFull as exc:
            raise ApiError(429, str(exc), kind="rate_limit_error", code="queue_full") from None
        except Unavailable as exc:
            raise ApiError(503, str(exc), kind="server_error", code="unavailable") from None
        self.sequences = sequences
        self.echoes = list(echoes) if echoes else [""] * len(sequences)
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

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        """OpenAI's completion logprobs of `entries` (None unless the request asked)."""
        if self.body.logprobs is None:
            return None
        piece = self.scheduler.tokenizer.decode
        top_logprobs = []
        for entry in entries:
            top = dict(entry.top[:self.body.logprobs])
            top.setdefault(entry.token, entry.logprob)  # the chosen token is always there
            top_logprobs.append({piece([i]): finite(lp) for i, lp in top.items()})
        return {"tokens": [piece([e.token]) for e in entries],
                "token_logprobs": [finite(e.logprob) for e in entries],
                "top_logprobs": top_logprobs, "text_offset": [e.offset for e in entries]}

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
        echo, self.echoes[index] = self.echoes[index], ""  # (the first delta carries it)
        choice = {"index": index, "text": echo + delta.text,
                  "logprobs": self.logprobs(delta.logprobs), "finish_reason": delta.finish_reason}
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
            choice = {"index": index, "text": self.echoes[index] + "".join(texts[index]),
                      "logprobs": self.logprobs(sequence.logprobs),
                      "finish_reason": sequence.finish_reason, **finish_fields(sequence)}
            if self.body.return_loops:
                choice["loops"] = list(sequence.loops)
            choices.append(choice)
        return choices


# ---- GET /metrics ------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus collector over `scheduler` and `http_counts` (HTTP status -> requests)."""

    def __init__(self, scheduler: Scheduler, http_counts: dict[int, int]):
        self.scheduler, self.http_counts = scheduler, http_counts

    def collect(self) -> Iterator[Any]:
        sched, http = self.scheduler, self.http_counts
        requests = CounterMetricFamily("loopedlm_requests", "HTTP completion requests by status",
                                       labels=["status"])
        for status, count in sorted(http.items()):
            requests.add_metric([str(status)], count)
        yield requests
        sequences = CounterMetricFamily("loopedlm_sequences_finished",
                                        "finished sequences by finish reason", labels=["reason"])
        for reason, count in sorted(sched.finished.items()):
            sequences.add_metric([reason], count)
        yield sequences
        for key, name, doc in (
                ("prompt_tokens", "loopedlm_prompt_tokens", "prompt tokens prefilled"),
                ("prompt_loops", "loopedlm_prompt_loops_spent", "loops spent on prompt tokens "
                                                                "(adaptive prompts: fewer)"),
                ("tokens", "loopedlm_generated_tokens", "tokens generated"),
                ("loops", "loopedlm_loops_spent", "loops spent on generated tokens (a token "
                                                  "at N loops counts N)"),
                ("steps", "loopedlm_decode_steps", "batched decode steps"),
                ("failed_steps", "loopedlm_failed_decode_steps", "decode steps that raised")):
            yield CounterMetricFamily(name, doc, value=sched.stats[key])
        yield GaugeMetricFamily("loopedlm_healthy", "1 when the server can generate (GET /health)",
                                value=float(sched.health().ok))
        yield GaugeMetricFamily("loopedlm_queue_length", "sequences waiting for a slot",
                                value=sched.queue_length)
        yield GaugeMetricFamily("loopedlm_batch_size", "sequences in the running batch",
                                value=sched.batch_size)


# ---- the server ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    """Server settings (each a `loopedlm serve` flag).

    max_batch: sequences decoded together. max_queue: sequences waiting for a slot before
    new requests get 429. max_loops: the largest n_loops a request may ask for (None:
    4 x the model's). timeout: the longest a request may take, in seconds.
    max_body_bytes: the largest request body (413 beyond it, before it is read whole).
    max_prompts: the most prompts in one request (400 beyond it). max_len: tokens per
    sequence, prompt included (None: the model's sequence_len; public models' is long, and
    the KV cache holds max_batch x max_len positions per loop and layer).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 256
    max_loops: int | None = None
    timeout: float = 300.0
    max_body_bytes: int = 1 << 20
    max_prompts: int = 32
    max_len: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("max_batch", 1), ("max_queue", 1), ("max_body_bytes", 1),
                          ("max_prompts", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ValueError(f"{name}={value!r} is not allowed: an integer >= {low}")
        if not is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is not allowed: an integer in [0, 65535] "
                             f"(0: any free port)")
        if self.max_len is not None and (not is_int(self.max_len) or self.max_len < 2):
            raise ValueError(f"max_len={self.max_len!r} is not allowed: an integer >= 2")
        if self.max_loops is not None and (not is_int(self.max_loops)
                                           or self.max_loops < 1):
            raise ValueError(f"max_loops={self.max_loops!r} is not allowed: an integer >= 1")
        if not isinstance(self.timeout, int | float) or not 0 < self.timeout < math.inf:
            raise ValueError(f"timeout={self.timeout!r} is not allowed: seconds > 0")


@dataclass(frozen=True)
class Plan:
    """A checked request, but for its prompts' token ids (tokenizing is the slow part)."""

    prompts: list[str | list[int]]
    params: SequenceParams
    stop: tuple[str, ...]
    timeout: float


class CompletionServer:
    """The model, its tokenizer, the engine and the scheduler behind the HTTP app."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, config: ServeConfig,
                 engine: SlotEngine | None = None):
        self.model, self.tokenizer, self.name, self.config = model, tokenizer, name, config
        self.max_loops = config.max_loops or 4 * model.config.n_loops
        max_len = None if config.max_len is None \
            else min(config.max_len, model.config.sequence_len)
        self.engine = engine or DecodeEngine(model, max_batch=config.max_batch,
                                             max_loops=self.max_loops, max_len=max_len,
                                             long_lived=True)
        self.context_len = self.engine.max_len
        self.scheduler = Scheduler(self.engine, tokenizer, max_queue=config.max_queue)
        # a token stands for at most this many bytes (so characters) of text, x4 for a
        # normalizer that merges characters: a longer prompt cannot fit the context, and is
        # refused before it is tokenized
        self.max_token_chars = 4 * max(1, int(tokenizer.token_bytes().max()))
        # tokenizing runs here, off the event loop (the tokenizer releases the GIL)
        self.tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="loopedlm-tokenize")
        self.http_counts: dict[int, int] = {}
        self.registry = CollectorRegistry()
        self.registry.register(ServerMetrics(self.scheduler, self.http_counts))
        self.created = int(time.time())

    # ---- request -> sequences ---------------------------------------------------------
    def check(self, body: CompletionRequest) -> Plan:
        """Every field of `body` that does not need the prompts' tokens, checked against this
        server (before anything is tokenized or touched: issue 22)."""
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"model {body.model[:60]!r} is not served here; this server "
                                f"serves {self.name!r} (GET /v1/models)", param="model",
                           code="model_not_found")
        for name, neutral in UNSUPPORTED.items():
            value = getattr(body, name)
            if not any(value == v and type(value) is not bool for v in neutral):
                raise ApiError(400, f"{name}={preview(value)} is not supported by this server "
                                    f"(leave it out, or {preview(neutral[-1])})", param=name)
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported by this server (the "
                                "prompt's logprobs): ask for one of them", param="echo")
        prompts = self.prompts(body.prompt)
        # (None: the model's loop count, filled by the engine)
        if body.n_loops is not None and body.n_loops > self.max_loops:
            raise ApiError(400, f"n_loops={body.n_loops} is not allowed: 1 .. {self.max_loops} "
                                f"(this server's --max-loops)", param="n_loops")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"stop={preview(list(stop))} is not allowed: at most {MAX_STOPS} "
                                f"non-empty strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
        timeout = min(body.timeout or self.config.timeout, self.config.timeout)
        return Plan(prompts, self.sequence_params(body), stop, timeout)

    def sequence_params(self, body: CompletionRequest) -> SequenceParams:
        """The engine's per-sequence settings of `body`: each value is checked here, before
        any engine state is touched (issue 22, D1)."""
        try:
            sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p,
                                      seed=body.seed)
            adaptive = AdaptiveLoops.given(body.adaptive_threshold, body.adaptive_criterion,
                                           prompt=body.adaptive_prompt)
            adaptive = adaptive and adaptive.resolved(self.model.exit_gate is not None)
            check_draft_loops(body.draft_loops, self.model.config.loops(body.n_loops))
            return SequenceParams(n_loops=body.n_loops, sampling=sampling, adaptive=adaptive,
                                  draft_loops=body.draft_loops, logprobs=body.logprobs)
        except ValueError as exc:
            raise ApiError(400, str(exc), param=str(exc).split("=", 1)[0]) from None

    def prompts(self, prompt: Any) -> list[str | list[int]]:
        """The request's prompts, each a string or token ids (their shape and number only)."""
        def is_ids(x):
            return isinstance(x, list) and x and all(is_int(t) for t in x)
        if isinstance(prompt, str) or is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(p, str) or is_ids(p) for p in prompt):
            raise ApiError(400, f"prompt={preview(prompt)} is not allowed: a string, a list of "
                                f"strings, a list of token ids, or a list of those",
                           param="prompt")
        limit = min(self.config.max_prompts, self.config.max_queue)
        if len(prompt) > limit:
            flag = "--max-prompts" if limit == self.config.max_prompts else "--max-queue"
            raise ApiError(400, f"prompt holds {len(prompt)} prompts; this server takes at most "
                                f"{limit} per request ({flag})", param="prompt")
        for i, p in enumerate(prompt):
            fewest = -(-len(p) // self.max_token_chars) + 1 if isinstance(p, str) else 0
            if fewest > self.context_len:  # (BOS included)
                raise ApiError(400, f"prompt {i} has {len(p)} characters, so at least {fewest} "
                                    f"tokens: longer than the model's context of "
                                    f"{self.context_len} tokens", param="prompt",
                               code="context_length_exceeded")
        return prompt

    def prompt_ids(self, prompts: list[str | list[int]]) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt (text gets BOS first, as documents in training) and its
        text; slow for long texts: run it off the event loop."""
        rows, texts = [], []
        for i, p in enumerate(prompts):
            ids = [self.tokenizer.bos_id, *self._encode(p, i)] if isinstance(p, str) \
                else list(p)
            try:  # where ids enter the server: a 400 now, not a failed sequence later
                check_token_ids(ids, self.model.config.vocab_size, f"prompt {i}: token id")
            except ValueError as exc:
                raise ApiError(400, str(exc), param="prompt") from None
            if len(ids) > self.context_len:
                raise ApiError(400, f"prompt {i} has {len(ids)} tokens, longer than the model's "
                                    f"context of {self.context_len} tokens", param="prompt",
                               code="context_length_exceeded")
            rows.append(ids)
            texts.append(p if isinstance(p, str) else self.tokenizer.decode(ids))
        return rows, texts

    def loop_trace(self, body: LoopTraceRequest) -> dict[str, Any]:
        """The per-loop view (`loopedlm.infer.trace`) of `body.completion` after
        `body.prompt`, with each token's text: one teacher-forced forward of the model as
        loaded (on CUDA the engine decodes a bf16 copy, so the trace can differ from what
        was sampled in the last digits). A completion given as text is tokenized alone."""
        if body.n_loops is not None and body.n_loops > self.max_loops:
            raise ApiError(400, f"n_loops={body.n_loops} is not allowed: 1 .. {self.max_loops} "
                                f"(this server's --max-loops)", param="n_loops")
        n_loops = self.model.config.loops(body.n_loops)  # (None: the model's)
        prompt = self.prompt_ids(self.prompts(body.prompt)[:1])[0][0]
        completion = body.completion
        if isinstance(completion, str):
            completion = self._encode(completion, 0)
        try:
            check_token_ids(completion, self.model.config.vocab_size, "completion: token id")
            trace = trace_loops(self.model, prompt, completion, n_loops=n_loops,
                                top_k=body.top_k)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="completion") from None
        decode = self.tokenizer.decode
        texts, done = [], ""
        for k in range(len(completion)):  # each token's own piece of the completion's text
            text = decode(completion[:k + 1])
            texts.append(text[len(done):])
            done = text
        return {"object": "loop_trace", "model": self.name, "n_loops": n_loops,
                "tokens": [{"text": piece, "token": entry["token"], "loops": [
                    {"entropy": step["entropy"], "p": step["p"],
                     "top": [{"text": decode([i]), "p": p} for i, p in step["top"]]}
                    for step in entry["loops"]]}
                    for piece, entry in zip(texts, trace, strict=True)]}

    def _encode(self, text: str, index: int) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except (ValueError, UnicodeError) as exc:  # e.g. a lone surrogate (issue 22, D2)
            raise ApiError(400, f"prompt {index} cannot be tokenized: {exc}",
                           param="prompt") from None

    def sequences(self, body: CompletionRequest, plan: Plan, rows: list[list[int]],
                  sink_for: Callable[[int], Callable[[Delta], None]]) -> list[Sequence]:
        """The sequences of a checked request whose prompts are `rows`."""
        longest = max(len(r) for r in rows)
        room = self.context_len - longest + 1
        if body.max_tokens > room:
            raise ApiError(400, f"max_tokens={body.max_tokens} is too large: the prompt has "
                                f"{longest} tokens and the context {self.context_len}, so at "
                                f"most {room} new tokens fit", param="max_tokens",
                           code="context_length_exceeded")
        # BOS ends a text (documents are BOS-delimited), and so does a model folder's EOS
        stop_ids = frozenset(getattr(self.tokenizer, "stop_ids", (self.tokenizer.bos_id,)))
        return [Sequence(prompt=ids, params=plan.params, max_tokens=body.max_tokens,
                         sink=sink_for(i), stop=plan.stop, stop_ids=stop_ids,
                         timeout=plan.timeout)
                for i, ids in enumerate(rows)]

    def count(self, status: int) -> None:
        self.http_counts[status] = self.http_counts.get(status, 0) + 1


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 without being kept or
    parsed (known at once from its Content-Length, else as soon as the streamed body passes
    the limit); a body within it is handed on to the app as it came.

    Before the 413 is sent, the rest of the body is read and dropped (up to DRAIN_BYTES): a
    server that closes a connection with unread data resets it, and the client, still
    sending, would see the reset instead of the 413."""

    DRAIN_BYTES = 64 << 20

    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[int], None]):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.reject(scope, receive, send, f"{int(declared)} bytes", more=True)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self.reject(scope, receive, send, f"more than {self.max_bytes} bytes",
                                  more=message.get("more_body", False))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def reject(self, scope: dict, receive: Callable, send: Callable, size: str, *,
                     more: bool) -> None:
        drained = 0
        while more and drained <= self.DRAIN_BYTES:  # (`more`: the body goes on)
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        self.on_reject(413)
        error = ApiError(413, f"the request body has {size}; this server takes at most "
                              f"{self.max_bytes} (--max-body-bytes)", code="body_too_large")
        response = error.response()
        response.headers["Connection"] = "close"  # the unread rest of the body is dropped
        await response(scope, receive, send)


# ---- the app ------------------------------------------------------------------------------
def create_app(model: Any, tokenizer: Any, *, name: str = "loopedlm",
               config: ServeConfig | None = None, engine: SlotEngine | None = None) -> FastAPI:
    """The FastAPI app serving `model` (eval mode, on its device) with `tokenizer`."""
    config = config or ServeConfig()
    server = CompletionServer(model.eval(), tokenizer, name=name, config=config, engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.close()
            server.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="loopedlm", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, on_reject=server.count)
    _add_error_handlers(app, server)
    _add_info_routes(app, server)
    _add_completions_route(app, server)
    _add_trace_route(app, server)
    return app


def _add_error_handlers(app: FastAPI, server: CompletionServer) -> None:
    """Errors answer in OpenAI's shape, and count in /metrics."""
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        server.count(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        server.count(400)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(HTTPException)  # the framework's own: an unreadable body, a 404 ...
    async def _http(request: Request, exc: HTTPException):
        server.count(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind=kind).response()


def _add_info_routes(app: FastAPI, server: CompletionServer) -> None:
    """GET /, /health, /metrics and /v1/models."""
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when the server can generate; 503 with the reason when it cannot (its decode
        worker stopped, or its engine failed and has not worked since)."""
        state = server.scheduler.health()
        body = {"status": "ok" if state.ok else "error", "model": server.name,
                "queue_length": server.scheduler.queue_length,
                "batch_size": server.scheduler.batch_size}
        if not state.ok:
            body["error"] = state.reason
        return JSONResponse(body, status_code=200 if state.ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cfg = server.model.config
        return {"object": "list", "data": [{
            "id": server.name, "object": "model", "created": server.created, "owned_by": "loopedlm",
            "loop_mode": cfg.loop_mode, "n_loops": cfg.n_loops,
            "max_loops": server.max_loops, "context_length": server.context_len}]}


def _add_completions_route(app: FastAPI, server: CompletionServer) -> None:
    """POST /v1/completions: streamed as server-sent events, or one JSON body."""
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        plan = server.check(body)
        rows, texts = await asyncio.get_running_loop().run_in_executor(
            server.tokenize_pool, server.prompt_ids, plan.prompts)
        completion = Completion(body, server.name, server.scheduler)
        completion.submit(server.sequences(body, plan, rows, completion.sink_for),
                          texts if body.echo else None)
        if body.stream:
            server.count(200)
            return completion.event_stream()
        response = await completion.collect(request)
        server.count(response.status_code)
        return response


def _add_trace_route(app: FastAPI, server: CompletionServer) -> None:
    """POST /v1/loop_trace: each completion token's distribution after every loop."""
    @app.post("/v1/loop_trace")
    async def loop_trace(body: LoopTraceRequest) -> dict[str, Any]:
        result = await asyncio.to_thread(server.loop_trace, body)  # the event loop stays free
        server.count(200)
        return result


# ---- running it ---------------------------------------------------------------------------
class CannotListen(OSError):
    """The server cannot listen on its host and port (in use, not permitted, no such
    address)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) (port 0: a free one); CannotListen, naming them, when
    that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(infos[0][4])
    except OSError as exc:
        sock.close()
        hint = "the port is in use (choose another --port, or --port 0 for any free one)" \
            if exc.errno == errno.EADDRINUSE else f"{exc.strerror or exc} (check --host and --port)"
        raise CannotListen(f"cannot listen on {host}:{port}: {hint}") from None
    return sock


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                        ) -> Iterator[str]:
    """Run `app` with uvicorn on a thread (tests, benchmarks); yields its base URL. Port 0
    picks a free port."""
    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(run: str, config: ServeConfig, *, device: str | None = None,
          name: str | None = None) -> None:
    """Serve a run folder's (or checkpoint folder's) model until interrupted. The port is
    taken first: CannotListen before anything is loaded or announced."""
    sock = listen(config.host, config.port)
    try:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = load_run(run, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        name = name or Path(run).resolve().name
        app = create_app(model, tokenizer, name=name, config=config)
        server = app.state.server
        log.info("serving %s (%s, %d loops by default, up to %d) on http://%s:%d with %d slots",
                 name, device, model.config.n_loops, server.max_loops, config.host,
                 sock.getsockname()[1], config.max_batch)
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["ServeConfig", "CompletionServer", "CompletionRequest", "ApiError", "Completion",
           "ServerMetrics", "BodyLimit", "CannotListen", "create_app", "listen",
           "serve_in_background", "serve", "UNSUPPORTED"]
