"""Decoding with the KV cache (issue 6): speed, cache memory, adaptive loops, shared slots.

1. Speed: decode tokens/s of the `tiny` preset at N = 1, 4, 12 with the cache (the decode
   engine's eager teacher-forced step, `DecodeEngine.decode`), at 512 tokens of context, and
   the speed-up over recomputing the full sequence for each new token. The tiny preset's
   sequence_len is 256, so the model here is built with sequence_len=1024 (everything else
   as the preset). Batch 1, weights from
   init_weights() (speed does not depend on their values).
2. KV-cache bytes per token at each N (fp32 and bf16).
3. Quality cost, measured by teacher-forced token-by-token decoding (the generation path,
   `decode_nll`) over held-out text, as bits per byte:
   - adaptive loops (state and KL criteria, several thresholds) vs fixed N: the change in
     bpb, the average loops spent, and decode time per token at batch 1;
   - shared cache slots (K < N slots, `block` and `modulo` policies) vs exact.
   With `--run RUN --text FILE`, a trained loopedlm run (with its tokenizer) and a
   held-out text file are used. Otherwise (the default) a stand-in is trained here: a
   byte-level model (1 token = 1 byte, so bpb = NLL / ln 2) with the tiny preset's shape,
   `flt` at `--train-loops`, trained with AdamW on the English text of Python's bundled
   documentation (`pydoc_data.topics`), the last 10% held out. It is cached in
   `--model-cache` so that reruns skip the training.

    python benchmarks/bench_decode.py [--threads 1] [--train-steps 600] [--skip-speed]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.infer import AdaptiveLoops, DecodeEngine, SequenceParams, loop_slot_map
from loopedlm.infer.generate import decode_nll

CONTEXT = 512


# ---- 1-2. speed and memory -----------------------------------------------------------
@torch.no_grad()
def decode_speed(model: LoopedGPT, n_loops: int, n_decode: int, n_recompute: int):
    """(cached tokens/s, recompute tokens/s) for one row at CONTEXT tokens of context."""
    vocab = model.config.vocab_size
    idx = torch.randint(0, vocab, (1, CONTEXT + n_decode))
    engine = DecodeEngine(model, max_batch=1, max_loops=n_loops, max_len=CONTEXT + n_decode)
    engine.prefill(0, idx[0, :CONTEXT], SequenceParams(n_loops=n_loops))
    times = []
    for t in range(CONTEXT, CONTEXT + n_decode):
        start = time.perf_counter()
        engine.decode(idx[:, t])
        times.append(time.perf_counter() - start)
    recompute = []
    for _ in range(n_recompute):
        start = time.perf_counter()
        model(idx[:, :CONTEXT + 1], n_loops=n_loops)  # the sequence with the new token
        recompute.append(time.perf_counter() - start)
    return 1 / statistics.median(times), 1 / statistics.median(recompute)


def cache_bytes(model: LoopedGPT, n_loops: int) -> int:
    """KV-cache bytes per token at `n_loops` loops, fp32, one entry per (loop, layer)."""
    engine = DecodeEngine(model, max_batch=1, max_len=1, max_loops=n_loops,
                          share_first_layer=False, dtype=torch.float32)
    return engine.cache.bytes_per_token()


def speed_section(args) -> None:
    cfg = ModelConfig.preset("tiny", sequence_len=1024)
    model = LoopedGPT.from_config(cfg, seed=0).eval()
    print(f"== decode speed: tiny preset with sequence_len=1024 (preset: 256), batch 1, "
          f"{CONTEXT} tokens of context, {torch.get_num_threads()} thread(s)")
    print(f"{'N':>3} {'cached tok/s':>13} {'recompute tok/s':>16} {'speed-up':>9} "
          f"{'KV bytes/token fp32':>20} {'bf16':>7}")
    for n_loops in (1, 4, 12):
        cached, recomputed = decode_speed(model, n_loops, args.decode_tokens, args.recompute)
        per_token = cache_bytes(model, n_loops)
        print(f"{n_loops:>3} {cached:>13.1f} {recomputed:>16.2f} {cached / recomputed:>8.1f}x "
              f"{per_token:>20,} {per_token // 2:>7,}")
    print("(KV bytes/token = 2 (k, v) x N loops x depth x n_kv_head x head_dim x bytes; "
          "shared slots replace N by K)")


# ---- 3. quality -----------------------------------------------------------------------
def corpus_bytes() -> bytes:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def train_byte_model(args) -> LoopedGPT:
    """The stand-in: a byte-level flt model, tiny-preset shape, trained here on CPU."""
    path = Path(args.model_cache)
    cfg = ModelConfig.preset("tiny", vocab_size=256, loop_mode="flt", n_loops=args.train_loops)
    model = LoopedGPT.from_config(cfg, seed=0)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"(stand-in model loaded from {path})")
        return model.eval()
    data = torch.tensor(list(corpus_bytes()), dtype=torch.long)
    train = data[: int(0.9 * len(data))]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    seq, batch = args.train_seq, args.train_batch
    start = time.perf_counter()
    for step in range(args.train_steps):
        lr = 3e-3 * min(1.0, (args.train_steps - step) / (0.2 * args.train_steps))
        for group in opt.param_groups:
            # constant, then linear to zero over the last 20% (docs/design.md#training-recipe)
            group["lr"] = lr
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        window = torch.stack([train[s:s + seq + 1] for s in starts])
        loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.train_steps - 1:
            print(f"  train step {step:>4}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f}s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def held_out_rows(args, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token windows of held-out text and the UTF-8 bytes of each target token."""
    if tokenizer is None:
        data = torch.tensor(list(corpus_bytes()), dtype=torch.long)
        data = data[int(0.9 * len(data)):]
        token_bytes = torch.ones(256, dtype=torch.long)
    else:
        ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"))
        data = torch.tensor(ids, dtype=torch.long)
        token_bytes = tokenizer.token_bytes()
    length = args.eval_len
    n_rows = min(args.eval_rows, len(data) // length)
    rows = data[: n_rows * length].view(n_rows, length)
    return rows, token_bytes[rows[:, 1:]]


def bpb(nll: torch.Tensor, n_bytes: torch.Tensor) -> float:
    keep = n_bytes > 0  # docs/design.md#evaluation: special tokens count in neither sum
    return float(nll[keep].sum() / (math.log(2) * n_bytes[keep].sum()))


@torch.no_grad()
def times_per_token(model, row, n_loops, options: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Mean decode-step time at batch 1 along one held-out row, and mean loops spent, for each
    named set of `SequenceParams` options. The configurations are stepped round-robin, token by
    token, so that a busy machine slows them all alike."""
    engines, times = {}, {name: [] for name in options}
    loops = {name: [] for name in options}
    for name, kw in options.items():
        engines[name] = DecodeEngine(model, max_batch=1, max_loops=n_loops, max_len=row.numel())
        engines[name].prefill(0, row[:1], SequenceParams(n_loops=n_loops, **kw))
    for t in range(1, row.numel()):
        for name in options:
            start = time.perf_counter()
            _, spent = engines[name].decode(row[t:t + 1])
            times[name].append(time.perf_counter() - start)
            loops[name].append(int(spent[0]))
    return {name: (statistics.mean(times[name]), statistics.mean(loops[name]))
            for name in options}


def quality_section(args) -> None:
    if args.run:
        from loopedlm.data.runs import load_run

        model, tokenizer, _, _ = load_run(args.run)
        source = f"trained run {args.run}, held-out text {args.text}"
    else:
        model, tokenizer = train_byte_model(args), None
        source = (f"stand-in byte-level flt model (tiny shape, trained {args.train_steps} "
                  f"steps at N={args.train_loops} here), held-out 10% of pydoc_data.topics")
    rows, n_bytes = held_out_rows(args, tokenizer)
    n_loops = args.eval_loops or model.config.n_loops
    print(f"\n== quality of the decoding path: {source}")
    print(f"   {rows.size(0)} rows x {rows.size(1)} tokens, teacher-forced token-by-token "
          f"decoding, N={n_loops}")

    def run(label, **kw):
        start = time.perf_counter()
        score = decode_nll(model, rows, n_loops=kw.pop("n", n_loops), **kw)
        seconds = time.perf_counter() - start
        return label, bpb(score.nll, n_bytes), float(score.loops[:, 1:].float().mean()), seconds

    def show(results, reference):
        print(f"{'':<28} {'bpb':>7} {'d bpb':>8} {'loops/token':>12} {'eval s':>7}")
        for label, value, loops, seconds in results:
            print(f"{label:<28} {value:>7.4f} {value - reference:>+8.4f} {loops:>12.2f} "
                  f"{seconds:>7.1f}")

    fixed = run(f"fixed N={n_loops}")
    results = [run(f"fixed N={n}", n=n) for n in range(1, n_loops)] + [fixed]
    print("\n-- adaptive loops (decoded tokens; the prompt's first token is a full prefill)")
    for threshold in args.state_thresholds:
        results.append(run(f"adaptive state < {threshold:g}",
                           adaptive=AdaptiveLoops(threshold, "state")))
    for threshold in args.kl_thresholds:
        results.append(run(f"adaptive KL < {threshold:g} nats",
                           adaptive=AdaptiveLoops(threshold, "kl")))
    show(results, fixed[1])

    row = rows[0, : args.timing_len]
    options = {f"fixed N={n_loops}": {}}
    options.update({f"adaptive state < {th:g}": {"adaptive": AdaptiveLoops(th, "state")}
                    for th in args.state_thresholds})
    options.update({f"adaptive KL < {th:g} nats": {"adaptive": AdaptiveLoops(th, "kl")}
                    for th in args.kl_thresholds})
    timed = times_per_token(model, row, n_loops, options)
    base = timed[f"fixed N={n_loops}"][0]
    print(f"\n   decode time per token at batch 1 (first {row.numel()} tokens of row 0, "
          f"mean, configurations interleaved):")
    for name, (seconds, loops) in timed.items():
        print(f"   {name:<26} {1e3 * seconds:6.2f} ms  ({base / seconds:.2f}x)  "
              f"loops/token {loops:.2f}")

    print("\n-- shared cache slots (exact cache = N slots)")
    results = [fixed]
    per_slot = cache_bytes(model, 1)
    for slots in args.slots:
        if slots >= n_loops:
            continue
        for policy in ("block", "modulo"):
            mapping = loop_slot_map(n_loops, slots, policy)
            results.append(run(f"K={slots} {policy} {mapping}", cache_slots=slots,
                               slot_policy=policy))
    show(results, fixed[1])
    print(f"   cache bytes/token: {per_slot:,} per slot (fp32), so N={n_loops} slots = "
          f"{per_slot * n_loops:,}; K slots = K x {per_slot:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: batch-1 decoding of tiny models is "
                             "fastest on one, and the shared machine is noisy)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--recompute", type=int, default=5)
    parser.add_argument("--run", default=None, help="a trained loopedlm run (needs --text)")
    parser.add_argument("--text", default=None, help="held-out text file for --run")
    parser.add_argument("--model-cache", default="/tmp/loopedlm_bench_decode/byte_flt.pt")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--train-loops", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--eval-loops", type=int, default=None)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--eval-len", type=int, default=192)
    parser.add_argument("--timing-len", type=int, default=96)
    parser.add_argument("--state-thresholds", type=float, nargs="*",
                        default=[0.3, 0.2, 0.1, 0.05])
    parser.add_argument("--kl-thresholds", type=float, nargs="*", default=[0.1, 0.01])
    parser.add_argument("--slots", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    if args.run and not args.text:
        parser.error("--run needs --text (a held-out text file)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.skip_speed:
        speed_section(args)
    if not args.skip_quality:
        quality_section(args)


if __name__ == "__main__":
    main()
