"""`loopedlm sample`: generate text from a run, streaming it to stdout
(`loopedlm.infer.generate.stream` does the work)."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Any

from loopedlm.cli import add_command, decoding_device
from loopedlm.infer.options import CRITERIA, DEFAULT_MAX_TOKENS, SLOT_POLICIES


def _cmd_sample(args: argparse.Namespace) -> int:
    from loopedlm.data.runs import load_run
    from loopedlm.infer.generate import stream, strip_trailing_spaces

    device = decoding_device(args.device)
    model, tokenizer, _, _ = load_run(args.run, device=device)
    n_loops = model.config.loops(args.n_loops)  # the default, filled (and checked) here
    # documents are BOS-delimited in training, so a generated BOS ends the text
    stop = [tokenizer.bos_id, *args.stop_id, *args.stop]
    given = dict(n_loops=n_loops, max_tokens=args.max_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop,
                 adaptive_threshold=args.adaptive_threshold,
                 adaptive_criterion=args.adaptive_criterion, min_loops=args.min_loops,
                 cache_slots=args.cache_slots, slot_policy=args.slot_policy,
                 compile=False if args.compile == "none" else args.compile)
    # a flag left unset is not passed: its default is the library's (GenerationOptions)
    options = {name: value for name, value in given.items() if value is not None}
    prompts = [strip_trailing_spaces(p) for p in args.prompt]
    start = time.perf_counter()
    outputs: list[list[int]] = [[] for _ in prompts]
    spent: list[int] = []
    shown = ""
    events = stream(model, prompts, tokenizer=tokenizer, **options)
    first = next(events, None)  # validates every option before anything is printed
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
    for event in itertools.chain([first] if first is not None else [], events):
        for r, tok in enumerate(event.tokens):
            if tok is not None:
                outputs[r].append(tok)
                spent.append(event.loops[r])
        if len(prompts) == 1:
            # print the new text as it comes; hold back an incomplete UTF-8 character
            text = tokenizer.decode(outputs[0])
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    if len(prompts) == 1:
        sys.stdout.write(tokenizer.decode(outputs[0])[len(shown):] + "\n")
    else:
        for prompt, ids in zip(prompts, outputs, strict=True):
            print(f"--- {prompt}\n{prompt}{tokenizer.decode(ids)}")
    seconds = time.perf_counter() - start
    n_tokens = sum(len(o) for o in outputs)
    mean_loops = sum(spent) / len(spent) if spent else float("nan")
    print(f"[{n_tokens} tokens in {seconds:.2f}s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s, "
          f"loops per token {mean_loops:.2f} of {n_loops}]",
          file=sys.stderr)
    return 0


def register(subparsers: Any) -> None:
    """Add `loopedlm sample`."""
    p = add_command(subparsers, "sample",
                    description="Generate text from a run (its latest checkpoint) or a "
                                "checkpoint folder, streaming tokens to stdout. An option left "
                                "unset takes the library's default (loopedlm.infer.generate."
                                "GenerationOptions).")
    p.add_argument("run", help="run folder or checkpoint folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch; one prompt streams)")
    p.add_argument("--n-loops", type=int, default=None, help="loops (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to generate (default {DEFAULT_MAX_TOKENS}, as OpenAI's API)")
    # sample's own default (the library's and the API's is 1.0): a little cooler for reading
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[],
                   help="stop string (a single token); BOS always stops")
    p.add_argument("--stop-id", action="append", type=int, default=[], help="stop token id")
    p.add_argument("--adaptive-threshold", type=float, default=None,
                   help="stop looping a token once its loop state changes less than this")
    p.add_argument("--adaptive-criterion", choices=CRITERIA, default=None)
    p.add_argument("--min-loops", type=int, default=None)
    p.add_argument("--cache-slots", type=int, default=None,
                   help="loops share this many KV-cache slots (less memory, approximate)")
    p.add_argument("--slot-policy", choices=SLOT_POLICIES, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", choices=["none", "step", "loop"], default=None,
                   help="torch.compile the decode step or one loop (pays off on CPU for long "
                        "outputs; see benchmarks/README.md)")
    p.set_defaults(func=_cmd_sample)


__all__ = ["register"]
