"""`loopedlm serve`: an OpenAI-compatible HTTP server for a looped model, where every
request chooses its loop budget.

Endpoints (FastAPI + uvicorn):

* `POST /v1/completions`, as OpenAI's: `prompt` (a string, a list of strings, token ids,
  or a list of those), `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `stream`
  (server-sent events ending in `data: [DONE]`; `stream_options.include_usage`),
  `usage`. Extra request fields: `n_loops` (loops per token, default the model's),
  `adaptive_threshold` (stop looping a token once its loop state changes less than
  this; n_loops is then the most it may use), `return_loops` (also list the loops
  spent on every token), `timeout` (seconds, at most the server's). Every choice reports
  `mean_loops` (and `loops` when asked). Finish reasons: "stop", "length", "timeout".
* `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).
* `GET /`: a web page to try prompts at any loop budget, each token shaded by the loops
  it used.

Errors follow OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for
a bad request (invalid JSON, wrong types, values out of range, a prompt longer than the
context, max_tokens beyond it), 404 for an unknown model, 429 when the queue is full.
A client that disconnects cancels its sequences, which frees their slots at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from loopedlm.common.validation import is_int
from loopedlm.infer.api import ApiError, CompletionRequest, validation_message
from loopedlm.infer.completions import Completion
from loopedlm.infer.loading import load_run_tokenizer
from loopedlm.infer.metrics import ServerMetrics
from loopedlm.infer.protocol import SequenceParams, SlotEngine
from loopedlm.infer.sampling import SamplingParams
from loopedlm.infer.scheduler import Scheduler, Sequence
from loopedlm.infer.slots import EngineSlots
from loopedlm.model.checkpoint import load_model

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass(frozen=True)
class ServeConfig:
    """Server settings (each a `loopedlm serve` flag).

    max_batch: sequences decoded together. max_queue: sequences waiting for a slot before
    new requests get 429. max_loops: the largest n_loops a request may ask for (None:
    4 x the model's). timeout: the longest a request may take, in seconds.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_queue: int = 256
    max_loops: int | None = None
    timeout: float = 300.0

    def __post_init__(self) -> None:
        for name, low in (("port", 0), ("max_batch", 1), ("max_queue", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise ValueError(f"{name}={value!r} is not allowed: an integer >= {low}")
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
        cfg = model.config
        self.default_loops = cfg.n_loops
        self.max_loops = config.max_loops or 4 * cfg.n_loops
        self.engine = engine or EngineSlots(model, capacity=config.max_batch,
                                            max_loops=self.max_loops)
        self.context_len = self.engine.context_len
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
        vocab, rows = self.model.config.vocab_size, []
        for i, p in enumerate(prompt):
            ids = [self.tokenizer.bos_id, *self._encode(p, i)] if isinstance(p, str) \
                else list(p)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt {i} holds token id {bad[0]}, outside the vocabulary "
                                    f"[0, {vocab})", param="prompt")
            if len(ids) > self.context_len:
                raise ApiError(400, f"prompt {i} has {len(ids)} tokens, longer than the model's "
                                    f"context of {self.context_len} tokens", param="prompt",
                               code="context_length_exceeded")
            rows.append(ids)
        return rows

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
        n_loops = self.default_loops if body.n_loops is None else body.n_loops
        if n_loops > self.max_loops:
            raise ApiError(400, f"n_loops={n_loops} is not allowed: 1 .. {self.max_loops} "
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
            SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        except ValueError as exc:
            raise ApiError(400, str(exc), param=str(exc).split("=", 1)[0]) from None
        params = SequenceParams(n_loops=n_loops, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, adaptive_threshold=body.adaptive_threshold)
        return [Sequence(prompt=ids, params=params, max_tokens=body.max_tokens, sink=sink_for(i),
                         stop=stop, stop_ids=frozenset({self.tokenizer.bos_id}), timeout=timeout)
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
            "loop_mode": cfg.loop_mode, "n_loops": server.default_loops,
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
    tokenizer = load_run_tokenizer(run)
    model, _ = load_model(run, device=device)
    name = name or Path(run).resolve().name
    app = create_app(model, tokenizer, name=name, config=config)
    server = app.state.server
    log.info("serving %s (%s, %d loops by default, up to %d) on http://%s:%d with %d slots",
             name, device, server.default_loops, server.max_loops, config.host, config.port,
             config.max_batch)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


__all__ = ["ServeConfig", "CompletionServer", "create_app", "serve_in_background", "serve"]
