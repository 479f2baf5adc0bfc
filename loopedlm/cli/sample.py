"""`loopedlm sample`: generate text from a run, streaming it to stdout
(`loopedlm.infer.generate.stream` does the work)."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Any

from loopedlm.cli import add_command, decoding_device
from loopedlm.infer.options import (
    CRITERIA,
    DEFAULT_DRAFT_TOKENS,
    DEFAULT_MAX_TOKENS,
    SLOT_POLICIES,
)


def _cmd_sample(args: argparse.Namespace) -> int:
    from loopedlm.data.runs import load_run
    from loopedlm.data.tokenizer import IncrementalText
    from loopedlm.infer.generate import stream, strip_trailing_spaces

    device = decoding_device(args.device)
    model, tokenizer, _, _ = load_run(args.run, device=device)
    n_loops = model.config.loops(args.n_loops)  # the default, filled (and checked) here
    # documents are BOS-delimited in training, so a generated BOS ends the text (and a
    # public model's end-of-text token: Tokenizer.stop_ids)
    stop = [*tokenizer.stop_ids, *args.stop_id, *args.stop]
    given = dict(n_loops=n_loops, max_tokens=args.max_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop,
                 adaptive_threshold=args.adaptive_threshold,
                 adaptive_criterion=args.adaptive_criterion, min_loops=args.min_loops,
                 adaptive_prompt=args.adaptive_prompt or None,
                 draft_loops=args.draft_loops, draft_tokens=args.draft_tokens,
                 cache_slots=args.cache_slots, slot_policy=args.slot_policy,
                 compile=False if args.compile == "none" else args.compile)
    # a flag left unset is not passed: its default is the library's (GenerationOptions)
    options = {name: value for name, value in given.items() if value is not None}
    prompts = [strip_trailing_spaces(p) for p in args.prompt]
    start = time.perf_counter()
    outputs: list[list[int]] = [[] for _ in prompts]
    spent: list[int] = []
    shown, shown_text = "", IncrementalText(tokenizer)
    events = stream(model, prompts, tokenizer=tokenizer, **options)
    first = next(events, None)  # validates every option before anything is printed
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
    event = first
    for event in itertools.chain([first] if first is not None else [], events):
        for r, tok in enumerate(event.tokens):
            if tok is not None:
                outputs[r].append(tok)
                spent.append(event.loops[r])
        if len(prompts) == 1:
            # print the new text as it comes; hold back an incomplete UTF-8 character
            text = shown_text.text(outputs[0])
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
    if args.trace_loops:
        _print_traces(model, tokenizer, prompts, outputs, n_loops, args.adaptive_threshold)
    n_tokens = sum(len(o) for o in outputs)
    mean_loops = sum(spent) / len(spent) if spent else float("nan")
    speculation = "" if event is None or event.speculation is None else (
        f", draft acceptance {event.speculation.acceptance:.2f}, "
        f"{event.speculation.tokens_per_round:.2f} tokens per verify pass")
    print(f"[{n_tokens} tokens in {seconds:.2f}s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s, "
          f"loops per token {mean_loops:.2f} of {n_loops}{speculation}]",
          file=sys.stderr)
    return 0


def _print_traces(model: Any, tokenizer: Any, prompts: list[str], outputs: list[list[int]],
                  n_loops: int, adaptive: float | None) -> None:
    from loopedlm.infer.trace import format_trace, trace_loops

    print("--- per-loop view: each generated token's distribution after every loop "
          "(H: entropy in nats; p: the token's probability; top tokens)"
          + (" [adaptive loops: a token that stopped early was drawn at its last loop]"
             if adaptive is not None else ""))
    for prompt, ids in zip(prompts, outputs, strict=True):
        if len(prompts) > 1:
            print(f"--- {prompt}")
        trace = trace_loops(model, [tokenizer.bos_id, *tokenizer.encode(prompt)], ids,
                            n_loops=n_loops)
        print(format_trace(trace, tokenizer))


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
                   help="stop string (a single token); BOS (and a model's EOS) always stops")
    p.add_argument("--stop-id", action="append", type=int, default=[], help="stop token id")
    p.add_argument("--adaptive-threshold", type=float, default=None,
                   help="stop looping a token once its loop state changes less than this "
                        "(gate: once its cumulative exit probability reaches this)")
    p.add_argument("--adaptive-criterion", choices=CRITERIA, default=None,
                   help="exit criterion (default: the model's own: gate for Ouro, else state)")
    p.add_argument("--min-loops", type=int, default=None,
                   help="never stop before this many loops (default: 2; 1 for gate and "
                        "kl_previous)")
    p.add_argument("--adaptive-prompt", action="store_true",
                   help="the prompt's tokens stop looping by the same rule (state or gate; "
                        "default: the prompt runs every loop)")
    p.add_argument("--draft-loops", type=int, default=None,
                   help="self-speculative decoding: the model at this many loops drafts tokens "
                        "that one pass at --n-loops verifies (the same output, faster)")
    p.add_argument("--draft-tokens", type=int, default=None,
                   help=f"tokens drafted per verify pass (default {DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--cache-slots", type=int, default=None,
                   help="loops share this many KV-cache slots (less memory, approximate)")
    p.add_argument("--slot-policy", choices=SLOT_POLICIES, default=None)
    p.add_argument("--trace-loops", action="store_true",
                   help="then print, for each generated token, the top tokens, the entropy "
                        "and the token's probability after every loop (the per-loop view)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compile", choices=["auto", "none", "step", "loop", "background"],
                   default=None,
                   help="torch.compile the decode step or one loop (default auto: where it "
                        "pays: the loop, in CUDA graphs, on a GPU; on a CPU the step, only once "
                        "torch.compile's on-disk caches hold it and the tokens left repay the "
                        "compile, eager until then (a step not compiled on this machine before "
                        "is compiled for later runs by a low-priority background process; "
                        "LOOPEDLM_COMPILE_WARMUP=0 turns it off); background: the step "
                        "compiled on a worker thread while decoding goes on eagerly)")
    p.set_defaults(func=_cmd_sample)


__all__ = ["register"]
