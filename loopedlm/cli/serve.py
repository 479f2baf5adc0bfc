"""`loopedlm serve`: the OpenAI-compatible server (`loopedlm.infer.server.serve` runs it;
the web stack is imported only when the command runs, so the rest of the CLI works
without the `serve` extra)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loopedlm.cli.exit_codes import CANNOT_LISTEN


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from loopedlm.infer.server import CannotListen, ServeConfig, serve
    except ModuleNotFoundError as exc:
        raise ValueError(f"loopedlm serve needs {exc.name}: pip install 'loopedlm[serve]'") from None
    limits = {name: getattr(args, name) for name in ("max_body_bytes", "max_prompts")
              if getattr(args, name) is not None}  # (unset: ServeConfig's defaults)
    config = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                         max_queue=args.max_queue, max_loops=args.max_loops, timeout=args.timeout,
                         **limits)
    try:
        serve(args.run, config, device=args.device, name=args.name)
    except CannotListen as exc:  # checked before anything is loaded or announced
        print(f"loopedlm serve: error: {exc}", file=sys.stderr)
        return CANNOT_LISTEN
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm serve`."""
    p = subparsers.add_parser(
        "serve", help="serve a run over an OpenAI-compatible HTTP API",
        description="Serve a run (its latest checkpoint) or a checkpoint folder: POST "
                    "/v1/completions (OpenAI's, plus n_loops, adaptive_threshold, "
                    "return_loops), GET /v1/models, /health, /metrics, and a web page at /. "
                    f"Exit code {CANNOT_LISTEN}: the port is in use (or not allowed).")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences waiting for a slot before requests get 429")
    p.add_argument("--max-loops", type=int, default=None,
                   help="largest n_loops a request may ask for (default: 4x the model's)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; 413 beyond it (default: 1 MiB)")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="most prompts in one request; 400 beyond it (default: 32)")
    p.add_argument("--name", default=None, help="model name in the API (default: the folder's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=_cmd_serve)
