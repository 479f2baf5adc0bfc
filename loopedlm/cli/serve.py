"""`loopedlm serve`: the OpenAI-compatible server (`loopedlm.infer.server.serve` runs it;
the web stack is imported only when the command runs, so the rest of the CLI works
without the `serve` extra)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loopedlm.cli import add_command, decoding_device
from loopedlm.cli.exit_codes import CANNOT_LISTEN

FLAGS = ("host", "port", "max_batch", "max_queue", "max_loops", "timeout", "max_body_bytes",
         "max_prompts", "max_len")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from loopedlm.infer.server import CannotListen, ServeConfig, serve
    except ModuleNotFoundError as exc:
        raise ValueError(f"loopedlm serve needs {exc.name}: pip install 'loopedlm[serve]'") from None
    # a flag left unset is not passed: its default is ServeConfig's
    config = ServeConfig(**{name: getattr(args, name) for name in FLAGS
                            if getattr(args, name) is not None})
    try:
        serve(args.run, config, device=decoding_device(args.device), name=args.name)
    except CannotListen as exc:  # checked before anything is loaded or announced
        print(f"loopedlm serve: error: {exc}", file=sys.stderr)
        return CANNOT_LISTEN
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm serve`."""
    p = add_command(
        subparsers, "serve",
        description="Serve a run (its latest checkpoint) or a checkpoint folder: POST "
                    "/v1/completions (OpenAI's, plus n_loops, adaptive_threshold, "
                    "return_loops), GET /v1/models, /health, /metrics, and a web page at /. "
                    "A flag left unset takes the server's default (ServeConfig). "
                    f"Exit code {CANNOT_LISTEN}: the port is in use (or not allowed).")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None, help="0: any free port")
    p.add_argument("--max-batch", type=int, default=None, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=None,
                   help="sequences waiting for a slot before requests get 429")
    p.add_argument("--max-loops", type=int, default=None,
                   help="largest n_loops a request may ask for (default: 4x the model's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds a request may take")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; 413 beyond it")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="most prompts in one request; 400 beyond it")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence, prompt included (default: the model's "
                        "sequence_len; set it for public models, whose context is long)")
    p.add_argument("--name", default=None, help="model name in the API (default: the folder's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=_cmd_serve)
