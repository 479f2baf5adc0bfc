"""Public looped models (issue 27, docs/public_models.md): decode tokens/s and mean loops per
token of a random-weight model of Ouro-1.4B's exact shape, at its fixed trained depth (4
loops) against adaptive depth (Ouro's exit-gate rule, and loopedlm's own `state` criterion),
on the same engine in the same run; (`--fit`) whether serving Ouro-1.4B in bf16 fits a
24 GiB GPU, computed from a meta-device model and KV cache of its exact shape; and
(`--memory`) the peak memory of loading a bf16 Ouro-1.4B folder through loopedlm's one
loading path.

Ouro-1.4B's shape, from its published config.json (ByteDance/Ouro-1.4B): hidden_size 2048,
24 layers, 16 attention heads and 16 key/value heads (no GQA), head_dim 128,
intermediate_size 5632, vocab_size 49152, total_ut_steps 4, rope_theta 1e6, rms_norm_eps
1e-6, untied embeddings. With random weights the exit gate's probabilities are random too
(sigmoid of a N(0, 1) logit per token), so the adaptive figures show what skipping loops
buys on this machine, not Ouro's own exit statistics.

    nice -n 10 python benchmarks/bench_public_models.py                  # fp32 on CPU
    nice -n 10 python benchmarks/bench_public_models.py --tokens 8 --threshold 0.5 0.8
    nice -n 10 python benchmarks/bench_public_models.py --fit            # 24 GiB? (instant)
    nice -n 10 python benchmarks/bench_public_models.py --memory         # load a bf16 folder
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loopedlm import LoopedGPT
from loopedlm.infer import AdaptiveLoops, DecodeEngine, SamplingParams, SequenceParams
from loopedlm.infer.cache import StaticKVCache, loop_slot_map
from loopedlm.model.public import ouro_config

OURO_1_4B = {
    "model_type": "ouro", "architectures": ["OuroForCausalLM"], "hidden_size": 2048,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "head_dim": 128, "intermediate_size": 5632, "vocab_size": 49152, "hidden_act": "silu",
    "max_position_embeddings": 65536, "rope_theta": 1000000.0, "rope_scaling": None,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
    "total_ut_steps": 4, "early_exit_threshold": 1.0, "torch_dtype": "bfloat16",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GIB = 2**30
# the serving settings docs/public_models.md recommends for Ouro-1.4B on a 24 GiB GPU
SERVE = {"max_batch": 4, "max_len": 4096, "max_loops": 4}


def memory_estimate(max_batch: int = SERVE["max_batch"], max_len: int = SERVE["max_len"],
                    max_loops: int = SERVE["max_loops"], dtype: torch.dtype = torch.bfloat16
                    ) -> dict[str, int]:
    """Bytes of GPU memory that serving Ouro-1.4B takes (`loopedlm serve --max-batch
    --max-len --max-loops`), with its weights in `dtype` (bf16, as published).

    weights: the parameters and buffers (RoPE tables) of a meta-device LoopedGPT of the
    exact shape, as loading gives them (stored dtype, no fp32 copy). kv_cache: the
    StaticKVCache the engine allocates, built on the meta device (one (keys, values) pair
    per loop and layer, max_batch x max_len positions each). prefill: an upper bound on the
    largest transient, a prompt of max_len tokens in one pass: its logits (dtype and the
    fp32 copy), one layer's attention scores in fp32 as if SDPA took its math path
    (flash/memory-efficient kernels hold none), the MLP's gate, up and product, and four
    (tokens, hidden) streams. Nothing is allocated."""
    config = ouro_config(OURO_1_4B)
    with torch.device("meta"):
        model = LoopedGPT(config).to(dtype)
    weights = sum(t.numel() * t.element_size()
                  for t in [*model.parameters(), *model.buffers()])
    cache = StaticKVCache(config, max_batch, max_len, loop_slot_map(max_loops),
                          share_first_layer=False, dtype=dtype, device="meta").nbytes()
    size = torch.tensor([], dtype=dtype).element_size()
    logits = max_len * config.vocab_size * (size + 4)
    scores = config.n_head * max_len * max_len * 4
    mlp = 3 * max_len * OURO_1_4B["intermediate_size"] * size
    streams = 4 * max_len * config.d_model * size
    return {"weights": weights, "kv_cache": cache,
            "prefill": logits + scores + mlp + streams}


def bench_fit() -> None:
    parts = memory_estimate()
    total = sum(parts.values())
    print(f"Ouro-1.4B in bf16, serve --max-batch {SERVE['max_batch']} --max-len "
          f"{SERVE['max_len']} --max-loops {SERVE['max_loops']} (meta-device model and KV "
          f"cache of the exact shape; the CUDA context, about 0.5 GiB, comes on top):")
    for name, n in parts.items():
        print(f"  {name:9s} {n / GIB:6.2f} GiB")
    print(f"  total     {total / GIB:6.2f} GiB of 24 GiB: "
          f"{'fits' if total < 24 * GIB else 'does NOT fit'}")


@torch.no_grad()
def random_ouro(dtype: torch.dtype, seed: int = 0) -> LoopedGPT:
    """Ouro-1.4B's shape with random weights: matrices N(0, 0.02), norms 1, and an exit gate
    whose logit is N(0, 1) on a normalised state."""
    config = ouro_config(OURO_1_4B)
    with torch.device("meta"):
        model = LoopedGPT(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and not name.startswith("exit_gate"):
            p.fill_(1.0)
        elif name.startswith("exit_gate"):
            p.copy_(torch.randn(p.shape, generator=gen) * (config.d_model ** -0.5
                                                            if p.dim() == 2 else 0.0))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.reset_rotary()
    return model.to(dtype).eval()


def decode(engine: DecodeEngine, prompts: torch.Tensor, params: SequenceParams, tokens: int
           ) -> tuple[float, float]:
    """(tokens/s of the decode steps, mean loops per decoded token) for `prompts` (B, T)."""
    for slot in range(prompts.size(0)):
        engine.add(slot, prompts[slot], params)
    loops, start = [], time.perf_counter()
    for _ in range(tokens):
        loops += engine.step().host()[1]
    seconds = time.perf_counter() - start
    engine.reset()
    return prompts.size(0) * tokens / seconds, statistics.fmean(loops)


def bench_decode(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model = random_ouro(dtype)
    params_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    engine = DecodeEngine(model, max_batch=args.batch, max_len=args.prompt + args.tokens + 1,
                          max_loops=model.config.n_loops)
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                            generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0)
    runs = [("fixed depth 4", SequenceParams(n_loops=4, sampling=greedy))]
    runs += [(f"adaptive: gate, q={q:g}", SequenceParams(
        n_loops=4, sampling=greedy, adaptive=AdaptiveLoops(q, "gate"))) for q in args.threshold]
    runs += [(f"adaptive: state, threshold={t:g}", SequenceParams(
        n_loops=4, sampling=greedy, adaptive=AdaptiveLoops(t, "state"))) for t in args.state]
    decode(engine, prompts[:, :4], runs[0][1], 1)  # warm-up
    fixed_name, fixed = runs[0]
    results, fixed_runs = [], []
    # each adaptive run is timed right after a fixed-depth run and compared with it, so that
    # a busy machine's drift falls on both sides of each ratio; --repeats such pairs, their
    # medians reported
    for name, params in runs[1:] or runs[:1]:
        pairs = []
        for _ in range(args.repeats):
            base, _ = decode(engine, prompts, fixed, args.tokens)
            fixed_runs.append(base)
            tok_s, mean_loops = decode(engine, prompts, params, args.tokens)
            pairs.append((tok_s, tok_s / base))
            print(f"  {fixed_name}: {base:.3f} tok/s; {name}: {tok_s:.3f} tok/s, "
                  f"{mean_loops:.2f} loops/token", flush=True)
        results.append((name, statistics.median(t for t, _ in pairs), mean_loops,
                        statistics.median(r for _, r in pairs)))
    results.insert(0, (fixed_name, statistics.median(fixed_runs), 4.0, 1.0))
    print(f"\nOuro-1.4B shape, random weights, {args.dtype}, CPU ({torch.get_num_threads()} "
          f"threads), batch {args.batch}, prompt {args.prompt}, {args.tokens} decoded tokens; "
          f"weights {params_gb:.2f} GB, KV cache {engine.cache.nbytes() / 1e6:.0f} MB "
          f"({engine.cache.bytes_per_token() / 1e3:.0f} kB per token); load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"({args.repeats} pair(s) per adaptive setting: medians)")
    print("| decoding | tok/s | mean loops/token | tok/s vs the fixed run before it |")
    print("|---|---:|---:|---:|")
    for name, tok_s, mean_loops, ratio in results:
        print(f"| {name} | {tok_s:.3f} | {mean_loops:.2f} | {ratio:.2f}x |")


def _write_folder(folder: Path) -> None:
    from safetensors.torch import save_file

    model = random_ouro(torch.bfloat16)
    theirs = {}
    names = {"transformer.wte.weight": "model.embed_tokens.weight",
             "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight",
             "exit_gate.weight": "model.early_exit_gate.weight",
             "exit_gate.bias": "model.early_exit_gate.bias"}
    layer = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj",
             "attn.c_v": "self_attn.v_proj", "attn.c_proj": "self_attn.o_proj",
             "mlp.c_gate": "mlp.gate_proj", "mlp.c_up": "mlp.up_proj",
             "mlp.c_proj": "mlp.down_proj", "attn_norm": "input_layernorm",
             "attn_out_norm": "input_layernorm_2", "mlp_norm": "post_attention_layernorm",
             "mlp_out_norm": "post_attention_layernorm_2"}
    for ours, tensor in model.state_dict().items():
        if ours.startswith("transformer.h."):
            _, _, i, rest = ours.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            theirs[f"model.layers.{i}.{layer[module]}.{leaf}"] = tensor
        else:
            theirs[names[ours]] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    save_file(theirs, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(OURO_1_4B))


def _load_folder(folder: Path) -> None:
    from loopedlm.model.checkpoint import load_model

    start = time.perf_counter()
    model, _ = load_model(folder)
    seconds = time.perf_counter() - start
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)
    with torch.no_grad():  # read every weight once (safetensors maps the file lazily)
        for p in model.parameters():
            p.sum()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"loaded a bf16 Ouro-1.4B folder in {seconds:.1f}s: weights {weights:.2f} GB "
          f"({', '.join(dtypes)}); peak resident memory of the process {loaded:.2f} GB after "
          f"loading, {peak:.2f} GB after reading every weight (an fp32 copy would add "
          f"{2 * weights:.2f} GB)")


def bench_memory() -> None:
    """Write a random bf16 Ouro-1.4B folder (published names), then load it in a fresh
    process: its peak memory is the weights plus the interpreter, no fp32 copy."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ouro-1.4b"
        for step in ("--write-folder", "--load-folder"):
            subprocess.run([sys.executable, __file__, step, str(folder)], check=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12, help="decoded tokens per run")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="(fixed, adaptive) pairs timed per adaptive setting")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="float32 (default: CPUs without bf16 units run bf16 slowly)")
    parser.add_argument("--threshold", type=float, nargs="*", default=[0.5, 0.8],
                        help="Ouro exit thresholds q (gate rule)")
    parser.add_argument("--state", type=float, nargs="*", default=[],
                        help="thresholds of loopedlm's `state` criterion")
    parser.add_argument("--fit", action="store_true",
                        help="print whether serving Ouro-1.4B in bf16 fits 24 GiB")
    parser.add_argument("--memory", action="store_true",
                        help="measure loading a bf16 folder instead of decoding")
    parser.add_argument("--write-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_folder:
        _write_folder(args.write_folder)
    elif args.load_folder:
        _load_folder(args.load_folder)
    elif args.fit:
        bench_fit()
    elif args.memory:
        bench_memory()
    else:
        bench_decode(args)


if __name__ == "__main__":
    main()
