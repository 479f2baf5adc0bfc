"""`loopedlm serve`: an OpenAI-compatible HTTP server for a looped model, where every
request chooses its loop budget.

Endpoints (FastAPI + uvicorn):

* `POST /v1/completions`, as OpenAI's: `prompt` (a string, a list of strings, token ids,
  or a list of those), `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `stream`
  (server-sent events ending in `data: [DONE]`; `stream_options.include_usage`),
  `usage`. Extra request fields: `n_loops` (loops per token, default the model's),
  `adaptive_threshold` (stop looping a token once its loop state changes less than
  this, or for Ouro once its exit gate's cumulative probability reaches it; n_loops is
  then the most it may use), `adaptive_criterion` (`state`, `kl`, `kl_previous`, `gate`;
  default the model's own), `draft_loops` (self-speculative decoding: the model at this
  many loops drafts tokens that n_loops verifies; same output), `return_loops` (also list
  the loops spent on every token), `timeout` (seconds, at most the server's). Every choice reports
  `mean_loops` (and `loops` when asked). Finish reasons: "stop", "length", "timeout".
* `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).
* `GET /`: a web page to try prompts at any loop budget, each token shaded by the loops
  it used.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for
a bad request (invalid JSON, wrong types, values out of range, a prompt longer than the
context, max_tokens beyond it), 404 for an unknown model, 429 when the queue is full.
A client that disconnects cancels its sequences, which frees their slots at once.

This file is the HTTP side: the request schema and errors (`CompletionRequest`,
`ApiError`), one request's answer (`Completion`: streamed or one body), the Prometheus
metrics (`ServerMetrics`) and the app. The scheduler (`loopedlm.infer.scheduler`) runs the
decode engine (`loopedlm.infer.engine.DecodeEngine`) on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
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

from loopedlm.common.validation import is_int
from loopedlm.data.runs import load_run
from loopedlm.infer.engine import (
    AdaptiveLoops,
    DecodeEngine,
    SequenceParams,
    check_draft_loops,
)
from loopedlm.infer.options import DEFAULT_MAX_TOKENS
from loopedlm.infer.sampling import SamplingParams
from loopedlm.infer.scheduler import Delta, QueueFull, Scheduler, Sequence, SlotEngine
from loopedlm.infer.trace import DEFAULT_TOP_K, trace_loops
from loopedlm.model.config import check_token_ids

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"


# ---- the API: request body and errors in OpenAI's shape ----------------------------------
class CompletionRequest(BaseModel):
    """The body of POST /v1/completions (unknown fields are ignored, as OpenAI does)."""

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
    n_loops: int | None = Field(None, ge=1)
    adaptive_threshold: float | None = Field(None, ge=0)
    adaptive_criterion: str | None = None
    draft_loops: int | None = Field(None, ge=1)
    return_loops: bool = False
    timeout: float | None = Field(None, gt=0)


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
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = \
            status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message (and the first bad field) for a body that failed validation."""
    parts, param = [], None
    for error in exc.errors()[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', '')})")
            continue
        where = ".".join(loc) or "body"
        param = param or where
        got = error.get("input")
        shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)[:60]})"
        parts.append(f"{where}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(parts) or "invalid request", param


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
                ("tokens", "loopedlm_generated_tokens", "tokens generated"),
                ("loops", "loopedlm_loops_spent", "loops spent on generated tokens (a token "
                                                  "at N loops counts N)"),
                ("steps", "loopedlm_decode_steps", "batched decode steps")):
            yield CounterMetricFamily(name, doc, value=sched.stats[key])
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
    4 x the model's). timeout: the longest a request may take, in seconds. max_len: tokens
    per sequence, prompt included (None: the model's sequence_len; public models' is long,
    and the KV cache holds max_batch x max_len positions per loop and layer).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 256
    max_loops: int | None = None
    timeout: float = 300.0
    max_len: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("port", 0), ("max_batch", 1), ("max_queue", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ValueError(f"{name}={value!r} is not allowed: an integer >= {low}")
        if self.max_len is not None and (not is_int(self.max_len) or self.max_len < 2):
            raise ValueError(f"max_len={self.max_len!r} is not allowed: an integer >= 2")
        if self.max_loops is not None and (not is_int(self.max_loops)
                                           or self.max_loops < 1):
            raise ValueError(f"max_loops={self.max_loops!r} is not allowed: an integer >= 1")
        if not isinstance(self.timeout, int | float) or not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout!r} is not allowed: seconds > 0")


class CompletionServer:
    """The model, its tokenizer, the engine and the scheduler behind the HTTP app."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, config: ServeConfig,
                 engine: SlotEngine | None = None):
        self.model, self.tokenizer, self.name, self.config = model, tokenizer, name, config
        self.max_loops = config.max_loops or 4 * model.config.n_loops
        max_len = None if config.max_len is None \
            else min(config.max_len, model.config.sequence_len)
        self.engine = engine or DecodeEngine(model, max_batch=config.max_batch,
                                             max_loops=self.max_loops, max_len=max_len)
        self.context_len = self.engine.max_len
        self.scheduler = Scheduler(self.engine, tokenizer, max_queue=config.max_queue)
        self.http_counts: dict[int, int] = {}
        self.registry = CollectorRegistry()
        self.registry.register(ServerMetrics(self.scheduler, self.http_counts))
        self.created = int(time.time())

    # ---- request -> sequences ---------------------------------------------------------
    def prompt_ids(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt (text gets BOS first, as documents in training)."""
        def is_ids(x):
            return isinstance(x, list) and x and all(
                is_int(t) for t in x)
        if isinstance(prompt, str) or is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(
                isinstance(p, str) or is_ids(p) for p in prompt):
            raise ApiError(400, f"prompt={json.dumps(prompt)[:60]} is not allowed: a string, a "
                                f"list of strings, a list of token ids, or a list of those",
                           param="prompt")
        rows = []
        for i, p in enumerate(prompt):
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
        return rows

    def loop_trace(self, body: LoopTraceRequest) -> dict[str, Any]:
        """The per-loop view (`loopedlm.infer.trace`) of `body.completion` after
        `body.prompt`, with each token's text: one teacher-forced forward of the model as
        loaded (on CUDA the engine decodes a bf16 copy, so the trace can differ from what
        was sampled in the last digits). A completion given as text is tokenized alone."""
        if body.n_loops is not None and body.n_loops > self.max_loops:
            raise ApiError(400, f"n_loops={body.n_loops} is not allowed: 1 .. {self.max_loops} "
                                f"(this server's --max-loops)", param="n_loops")
        n_loops = self.model.config.loops(body.n_loops)  # (None: the model's)
        prompt = self.prompt_ids(body.prompt)[0]
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

    def sequences(self, body: CompletionRequest, sink_for) -> list[Sequence]:
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                                f"{self.name!r} (GET /v1/models)", param="model",
                           code="model_not_found")
        rows = self.prompt_ids(body.prompt)
        # (None: the model's loop count, filled by the engine)
        if body.n_loops is not None and body.n_loops > self.max_loops:
            raise ApiError(400, f"n_loops={body.n_loops} is not allowed: 1 .. {self.max_loops} "
                                f"(this server's --max-loops)", param="n_loops")
        longest = max(len(r) for r in rows)
        room = self.context_len - longest + 1
        if body.max_tokens > room:
            raise ApiError(400, f"max_tokens={body.max_tokens} is too large: the prompt has "
                                f"{longest} tokens and the context {self.context_len}, so at "
                                f"most {room} new tokens fit", param="max_tokens",
                           code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, f"stop={list(stop)} is not allowed: at most 4 non-empty strings",
                           param="stop")
        timeout = min(body.timeout or self.config.timeout, self.config.timeout)
        try:  # every value is checked here, before any engine state is touched (issue 22, D1)
            sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p,
                                      seed=body.seed)
            adaptive = None if body.adaptive_threshold is None \
                else AdaptiveLoops(body.adaptive_threshold, body.adaptive_criterion).resolved(
                    self.model.exit_gate is not None)
            check_draft_loops(body.draft_loops, self.model.config.loops(body.n_loops))
            params = SequenceParams(n_loops=body.n_loops, sampling=sampling, adaptive=adaptive,
                                    draft_loops=body.draft_loops)
        except ValueError as exc:
            raise ApiError(400, str(exc), param=str(exc).split("=", 1)[0]) from None
        # BOS ends a text (documents are BOS-delimited), and so does a model folder's EOS
        stop_ids = frozenset(getattr(self.tokenizer, "stop_ids", (self.tokenizer.bos_id,)))
        return [Sequence(prompt=ids, params=params, max_tokens=body.max_tokens, sink=sink_for(i),
                         stop=stop, stop_ids=stop_ids, timeout=timeout)
                for i, ids in enumerate(rows)]

    def count(self, status: int) -> None:
        self.http_counts[status] = self.http_counts.get(status, 0) + 1



# ---- the app ------------------------------------------------------------------------------
def create_app(model: Any, tokenizer: Any, *, name: str = "loopedlm",
               config: ServeConfig | None = None, engine: SlotEngine | None = None) -> FastAPI:
    """The FastAPI app serving `model` (eval mode, on its device) with `tokenizer`."""
    server = CompletionServer(model.eval(), tokenizer, name=name, config=config or ServeConfig(),
                              engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.close()

    app = FastAPI(title="loopedlm", lifespan=lifespan)
    app.state.server = server
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


def _add_info_routes(app: FastAPI, server: CompletionServer) -> None:
    """GET /, /health, /metrics and /v1/models."""
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.name, "queue_length": server.scheduler.queue_length,
                "batch_size": server.scheduler.batch_size}

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
        completion = Completion(body, server.name, server.scheduler)
        completion.submit(server.sequences(body, completion.sink_for))
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
@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                        ) -> Iterator[str]:
    """Run `app` with uvicorn on a thread (tests, benchmarks); yields its base URL. Port 0
    picks a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
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
    """Serve a run folder's (or checkpoint folder's) model until interrupted."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_run(run, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    name = name or Path(run).resolve().name
    app = create_app(model, tokenizer, name=name, config=config)
    server = app.state.server
    log.info("serving %s (%s, %d loops by default, up to %d) on http://%s:%d with %d slots",
             name, device, model.config.n_loops, server.max_loops, config.host, config.port,
             config.max_batch)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


__all__ = ["ServeConfig", "CompletionServer", "CompletionRequest", "ApiError", "Completion",
           "ServerMetrics", "create_app", "serve_in_background", "serve"]
