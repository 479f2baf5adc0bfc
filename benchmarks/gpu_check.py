"""The first thing to run on a GPU (issue 24): correctness checks, then the figures, in
under 8 minutes on one H100.

    python benchmarks/gpu_check.py                     # CUDA, the `small` preset
    python benchmarks/gpu_check.py --cpu               # the same checks at toy sizes on CPU
    python benchmarks/gpu_check.py --only bf16_forward,decode_graphs
    python benchmarks/gpu_check.py --only train_base_n3   # `base` MFU (not in the default set)

It prints the device's name and the torch version, a PASS / FAIL / SKIP line per check
and one table of figures, each beside its target from issue 24 (measured on an H100; the
CPU run only shows that every check runs). Each check builds its own model, runs under its
own time budget (cut to what is left of `--deadline`), and a failure or timeout in one
does not stop the others. Exit status 1 when any check fails.

Correctness: bf16 forward vs fp32 (autocast and bf16 weights); graph replay equals eager
decoding token for token, greedy (on CPU, where there are no graphs: the cached engine
equals a full-forward greedy decode); a training step with activation checkpointing, then
sampling (through `train`); the chunk-compiled head vs the eager one; cut-cross-entropy's
gradients vs the chunked path's (CUDA with `pip install 'loopedlm[cuda]'`).
Figures: `small` N=3 compiled tokens/s and MFU; N=12 with the every-loop loss, peak memory
with and without activation checkpointing; compile time at N=1 and N=12 (inductor's caches
off, dynamo reset: cold each time); decode tokens/s at N=1 and N=12, batch 1 and 16; eval
(bits per byte over random tokens) time at N=1; the head alone, eager vs compiled.

The decoding checks go through `loopedlm.infer.generate.generate` and are kept in small
functions (`greedy_tokens`, `decode_rate`) so that engine changes touch only them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.evaluate.bpb import evaluate_bpb
from loopedlm.infer import DecodeEngine
from loopedlm.infer.generate import generate
from loopedlm.model.head_loss import head_loss
from loopedlm.train.config import TrainConfig
from loopedlm.train.metrics import PeakMemory, mfu, peak_flops
from loopedlm.train.optim import LoopedOptimizer, OptimConfig
from loopedlm.train.parallel import apply_activation_checkpointing, compile_blocks
from loopedlm.train.trainer import train


@dataclass
class Sizes:
    """What the checks run at: `small` on a GPU, a toy model on CPU."""

    device: torch.device
    model: dict = field(default_factory=dict)  # ModelConfig overrides of the preset
    batch: int = 16  # training device batch (sequences)
    head_rows: int = 16 * 1024  # the head alone: rows (tokens of one loop)
    decode_prompt: int = 16
    decode_tokens: int = 128
    decode_batches: tuple[int, ...] = (1, 16)
    eval_batches: int = 32
    steps: int = 10  # timed training steps
    budget: float = 1.0  # multiplies every check's time budget

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def config(self, preset: str = "small", **overrides) -> ModelConfig:
        return ModelConfig.preset(preset, **{**self.model, **overrides})

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def gpu_sizes(device: torch.device) -> Sizes:
    return Sizes(device=device)


def cpu_sizes() -> Sizes:
    return Sizes(device=torch.device("cpu"), model=dict(depth=2, d_model=64, n_head=2,
                                                        vocab_size=512, sequence_len=64),
                 batch=2, head_rows=256, decode_prompt=8, decode_tokens=8, eval_batches=2,
                 steps=2, budget=0.5)


# ---- helpers -------------------------------------------------------------------------
def random_model(sizes: Sizes, preset: str = "small", *, std: float = 0.02,
                 **overrides) -> LoopedGPT:
    """A model with non-trivial weights: the init zeroes the output projections, which
    would leave every block an identity."""
    model = LoopedGPT.from_config(sizes.config(preset, **overrides), device=sizes.device,
                                  seed=0)
    gen = torch.Generator(device=sizes.device).manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=sizes.device) * std)
    return model


def tokens(sizes: Sizes, vocab: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=sizes.device).manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=gen, device=sizes.device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def greedy_tokens(model: LoopedGPT, prompts: list[list[int]], n_tokens: int, *,
                  graphs: bool | None = None, dtype: torch.dtype | None = None
                  ) -> list[list[int]]:
    """Greedy continuations through `generate` (`graphs`: CUDA-graph replay on or off)."""
    max_len = max(len(p) for p in prompts) + n_tokens
    engine = DecodeEngine(model, max_batch=len(prompts), max_len=max_len, graphs=graphs,
                          dtype=dtype)
    return generate(model, prompts, max_tokens=n_tokens, temperature=0.0, add_bos=False,
                    engine=engine).tokens


def naive_greedy(model: LoopedGPT, prompt: list[int], n_tokens: int) -> list[int]:
    """Greedy decoding by recomputing the full forward for every new token."""
    ids = torch.tensor([prompt], device=model.lm_head.weight.device)
    out = []
    with torch.no_grad():
        for _ in range(n_tokens):
            nxt = int(model(ids)[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out


def decode_rate(model: LoopedGPT, sizes: Sizes, batch: int, n_loops: int) -> float:
    """Generated tokens per second (batch x new tokens / time) over one greedy `generate`
    call on a warmed-up engine (graphs captured and kernels loaded by a first call)."""
    prompts = tokens(sizes, model.config.vocab_size, (batch, sizes.decode_prompt)).tolist()
    max_len = sizes.decode_prompt + sizes.decode_tokens
    engine = DecodeEngine(model, max_batch=batch, max_len=max_len, max_loops=n_loops)

    def once() -> float:
        sizes.sync()
        t0 = time.perf_counter()
        result = generate(model, prompts, max_tokens=sizes.decode_tokens, temperature=0.0,
                          add_bos=False, n_loops=n_loops, engine=engine)
        sizes.sync()
        return sum(len(t) for t in result.tokens) / (time.perf_counter() - t0)

    once()
    return once()


def train_steps(sizes: Sizes, preset: str, n_loops: int, loss_loops: str, *, compile: bool,
                checkpointing: bool, steps: int, warmup: int = 2) -> dict:
    """Training steps (forward + backward + clip + Muon/AdamW) on random tokens: the first
    step's time (compilation included), a steady step's, tokens/s, MFU and peak memory
    over the timed steps."""
    model = LoopedGPT.from_config(sizes.config(preset, n_loops=n_loops, loss_loops=loss_loops),
                                  device=sizes.device, seed=0)
    if checkpointing:
        apply_activation_checkpointing(model)
    model.head_options = {"compile": compile}
    if compile:
        compile_blocks(model)
    optimizer = LoopedOptimizer(model, OptimConfig())
    T = model.config.sequence_len
    x = tokens(sizes, model.config.vocab_size, (sizes.batch, T + 1))

    def step() -> float:
        sizes.sync()
        t0 = time.perf_counter()
        with sizes.autocast():
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sizes.sync()
        return time.perf_counter() - t0

    first = step()
    for _ in range(max(0, warmup - 1)):
        step()
    memory = PeakMemory(sizes.device)
    steady = sorted(step() for _ in range(steps))[steps // 2]
    tokens_per_s = sizes.batch * T / steady
    flops = model.estimate_flops(n_loops)
    return {"first_s": first, "step_s": steady, "tokens_per_s": tokens_per_s,
            "mfu": mfu(flops, tokens_per_s, peak_flops(sizes.device)),
            "peak_bytes": memory.peak_bytes(), "compile_s": max(0.0, first - steady)}


class ByteTokenizer:
    """Enough of the tokenizer contract for `train`: bytes, plus a BOS id."""

    vocab_size, bos_id, special_ids = 257, 256, {256}

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def token_bytes(self) -> torch.Tensor:
        table = torch.ones(self.vocab_size, dtype=torch.long)
        table[self.bos_id] = 0
        return table


class RandomTokens:
    """A data source for `train`: random byte tokens (speed and crashes, not learning)."""

    data_dir = "random"

    def loader(self, tokenizer, batch_size, seq_len, *, split, rank, world_size, device,
               loop=True):
        return _RandomLoader(batch_size, seq_len, device, seed=0 if split == "train" else 1)


class _RandomLoader:
    def __init__(self, batch_size, seq_len, device, seed):
        self.shape, self.device, self.seed, self.pos = (batch_size, seq_len + 1), device, seed, 0

    def next_batch(self):
        gen = torch.Generator().manual_seed(self.seed * 10**6 + self.pos)
        self.pos += 1
        rows = torch.randint(0, 256, self.shape, generator=gen).to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


# ---- the checks ----------------------------------------------------------------------
@dataclass
class Result:
    status: str  # PASS | FAIL | SKIP
    detail: str
    figures: dict[str, float | None] = field(default_factory=dict)


def check_bf16_forward(sizes: Sizes) -> Result:
    """Logits under bf16 autocast (training) and of a bf16 copy of the weights (inference)
    against fp32: relative error and top-1 agreement."""
    model = random_model(sizes).eval()
    idx = tokens(sizes, model.config.vocab_size, (2, min(256, model.config.sequence_len)))
    with torch.no_grad():
        ref = model(idx).float()
        with torch.autocast(sizes.device.type, dtype=torch.bfloat16):
            autocast = model(idx).float()
        weights = copy.deepcopy(model).to(torch.bfloat16)(idx).float()
    parts, ok = [], True
    for name, got in (("autocast", autocast), ("bf16 weights", weights)):
        err = relative_error(got, ref)
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        ok &= err < 0.05 and agree >= 0.9
        parts.append(f"{name}: rel. error {err:.2%}, top-1 agreement {agree:.1%}")
    return Result("PASS" if ok else "FAIL", "; ".join(parts) + " (allowed: < 5%, >= 90%)")


def check_decode_graphs(sizes: Sizes) -> Result:
    """Greedy tokens: CUDA-graph replay vs eager decoding (CUDA), else the cached engine
    vs a full-forward greedy decode (fp32)."""
    model = random_model(sizes, std=0.3 if not sizes.cuda else 0.02).eval()
    prompts = [tokens(sizes, model.config.vocab_size, (n,), seed=n).tolist()
               for n in (sizes.decode_prompt, sizes.decode_prompt // 2 + 1)]
    n = min(32, sizes.decode_tokens)
    if sizes.cuda:
        got, want = greedy_tokens(model, prompts, n, graphs=True), \
            greedy_tokens(model, prompts, n, graphs=False)
        what = "graph replay vs eager (bf16)"
    else:
        got = greedy_tokens(model, prompts, n)
        want = [naive_greedy(model, p, n) for p in prompts]
        what = "cached engine vs full forward (fp32; no CUDA graphs on CPU)"
    same = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w,
                                                                                strict=False))
    total = sum(len(w) for w in want)
    ok = got == want
    return Result("PASS" if ok else "FAIL", f"{what}: {same}/{total} tokens equal")


def check_train_checkpointing_then_sample(sizes: Sizes) -> Result:
    """`train` with activation checkpointing for two steps, sampling after the first and at
    the end (the decode engine built from a model whose loops are checkpointed)."""
    with tempfile.TemporaryDirectory() as tmp:
        batch, seq = 2, 64
        cfg = TrainConfig(run_dir=str(Path(tmp) / "run"), preset="tiny",
                          model={"sequence_len": seq}, total_batch_tokens=batch * seq,
                          device_batch_size=batch, steps=2, eval_every=0,
                          eval_tokens=batch * seq, save_every=0, sample_every=1,
                          sample_tokens=8, activation_checkpointing=True,
                          device=str(sizes.device), progress=False)
        summary = train(cfg, data=RandomTokens(), tokenizer=ByteTokenizer())
    ok = summary["status"] == "completed" and isinstance(summary.get("sample"), str)
    return Result("PASS" if ok else "FAIL", f"status {summary['status']}, final sample "
                  f"{summary.get('sample', '')[:24]!r}")


def _head_inputs(sizes: Sizes, rows: int):
    cfg = sizes.config()
    gen = torch.Generator(device=sizes.device).manual_seed(0)
    h = torch.randn(rows, cfg.d_model, generator=gen, device=sizes.device)
    weight = torch.randn(cfg.vocab_size, cfg.d_model, generator=gen, device=sizes.device) * 0.05
    targets = tokens(sizes, cfg.vocab_size, (rows,))
    targets[::7] = -1
    return h.requires_grad_(), weight.requires_grad_(), targets


def _head_grads(sizes: Sizes, h, weight, targets, *, autocast: bool = True, **options):
    h.grad = weight.grad = None
    with torch.autocast(sizes.device.type, dtype=torch.bfloat16,
                        enabled=autocast and sizes.cuda):
        loss = head_loss(h, weight, targets, 15.0, **options)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def _time_head(sizes: Sizes, h, weight, targets, repeats: int = 3, **options) -> float:
    _head_grads(sizes, h, weight, targets, **options)  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sizes.sync()
        t0 = time.perf_counter()
        _head_grads(sizes, h, weight, targets, **options)
        sizes.sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def check_head_compiled(sizes: Sizes) -> Result:
    """The chunked head with its chunk body compiled vs eager: loss and gradients, then
    the time of one loop's head + loss (forward + backward) at `head_rows` tokens."""
    h, weight, targets = _head_inputs(sizes, 3 * 1024 + 5 if sizes.cuda else 203)
    eager = _head_grads(sizes, h, weight, targets)
    compiled = _head_grads(sizes, h, weight, targets, compile=True)
    errors = [relative_error(c, e) for c, e in zip(compiled, eager, strict=True)]
    tolerance = 1e-2 if sizes.cuda else 1e-5
    h, weight, targets = _head_inputs(sizes, sizes.head_rows)
    figures = {"head_eager_ms": 1000 * _time_head(sizes, h, weight, targets),
               "head_compiled_ms": 1000 * _time_head(sizes, h, weight, targets, compile=True)}
    ok = max(errors) < tolerance
    return Result("PASS" if ok else "FAIL", f"rel. error loss {errors[0]:.1e}, grad h "
                  f"{errors[1]:.1e}, grad weight {errors[2]:.1e} (allowed {tolerance:.0e})",
                  figures)


def check_head_cce(sizes: Sizes) -> Result:
    """cut-cross-entropy's gradients against the fp32 chunked path, beside the chunked
    path's own bf16 error: within twice that, it could become a default."""
    if not sizes.cuda:
        return Result("SKIP", "cut-cross-entropy runs on CUDA only")
    try:
        from importlib.metadata import version
        release = version("cut-cross-entropy")
    except Exception:  # noqa: BLE001 - any failure means: not installed
        return Result("SKIP", "cut-cross-entropy is not installed (pip install "
                      "'loopedlm[cuda]')")
    h, weight, targets = _head_inputs(sizes, 4 * 1024)
    exact = _head_grads(sizes, h, weight, targets, autocast=False)
    chunked = _head_grads(sizes, h, weight, targets)
    cce = _head_grads(sizes, h, weight, targets, backend="cce")
    err_chunked = [relative_error(g, e) for g, e in zip(chunked[1:], exact[1:], strict=True)]
    err_cce = [relative_error(g, e) for g, e in zip(cce[1:], exact[1:], strict=True)]
    ok = all(c <= 2 * b + 1e-3 for c, b in zip(err_cce, err_chunked, strict=True))
    return Result("PASS" if ok else "FAIL", f"cut-cross-entropy {release}: rel. error of "
                  f"grad h / grad weight vs fp32: cce {err_cce[0]:.1e} / {err_cce[1]:.1e}, "
                  f"chunked bf16 {err_chunked[0]:.1e} / {err_chunked[1]:.1e}",
                  {"cce_grad_weight_error": err_cce[1],
                   "chunked_grad_weight_error": err_chunked[1]})


@contextlib.contextmanager
def _cold_compiler():
    """Dynamo reset and inductor's on-disk caches off: a compile from scratch."""
    torch.compiler.reset()
    import torch._inductor.config as inductor_config  # the documented switch

    with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*force_disable_caches")
        yield


def _compile_time(sizes: Sizes, n_loops: int) -> Result:
    with _cold_compiler():
        r = train_steps(sizes, "small", n_loops, "last", compile=True, checkpointing=False,
                        steps=2)
    return Result("PASS", f"first step {r['first_s']:.1f} s, steady {r['step_s'] * 1000:.0f} "
                  f"ms", {f"compile_s_n{n_loops}": r["compile_s"]})


def check_compile_time_n1(sizes: Sizes) -> Result:
    return _compile_time(sizes, 1)


def check_compile_time_n12(sizes: Sizes) -> Result:
    return _compile_time(sizes, 12)


def _throughput(sizes: Sizes, preset: str) -> Result:
    r = train_steps(sizes, preset, 3, "last", compile=True, checkpointing=False,
                    steps=sizes.steps)
    return Result("PASS", f"batch {sizes.batch}, step {r['step_s'] * 1000:.0f} ms",
                  {f"{preset}_n3_tokens_per_s": r["tokens_per_s"], f"{preset}_n3_mfu": r["mfu"]})


def check_train_small_n3(sizes: Sizes) -> Result:
    return _throughput(sizes, "small")


def check_train_base_n3(sizes: Sizes) -> Result:
    return _throughput(sizes, "base")


def _memory(sizes: Sizes, checkpointing: bool) -> Result:
    r = train_steps(sizes, "small", 12, "all", compile=True, checkpointing=checkpointing,
                    steps=2, warmup=1)
    key = f"memory_n12_all_{'ckpt' if checkpointing else 'plain'}_gib"
    peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
    return Result("PASS", f"batch {sizes.batch}, step {r['step_s'] * 1000:.0f} ms",
                  {key: peak})


def check_memory_n12_all(sizes: Sizes) -> Result:
    return _memory(sizes, False)


def check_memory_n12_all_checkpointing(sizes: Sizes) -> Result:
    return _memory(sizes, True)


def check_decode_tps(sizes: Sizes) -> Result:
    model = random_model(sizes, n_loops=12).eval()
    figures = {f"decode_n{n}_b{b}_tokens_per_s": decode_rate(model, sizes, b, n)
               for n in (1, 12) for b in sizes.decode_batches}
    return Result("PASS", f"prompt {sizes.decode_prompt}, {sizes.decode_tokens} new tokens, "
                  f"greedy", figures)


def check_eval_n1(sizes: Sizes) -> Result:
    model = random_model(sizes).eval()
    T = model.config.sequence_len
    batches = [(x[:, :-1], x[:, 1:]) for x in (tokens(sizes, model.config.vocab_size,
                                                      (sizes.batch, T + 1), seed=s)
                                               for s in range(sizes.eval_batches))]
    token_bytes = torch.ones(model.config.vocab_size, dtype=torch.long)
    evaluate_bpb(model, batches[:1], token_bytes, n_loops=1)  # warm-up
    sizes.sync()
    t0 = time.perf_counter()
    evaluate_bpb(model, batches, token_bytes, n_loops=1)
    sizes.sync()
    seconds = time.perf_counter() - t0
    n_tokens = sizes.eval_batches * sizes.batch * T
    return Result("PASS", f"{n_tokens:,} tokens in {sizes.eval_batches} batches",
                  {"eval_n1_s": seconds, "eval_n1_tokens_per_s": n_tokens / seconds})


# name -> (check, time budget in seconds on a GPU, part of the default set)
CHECKS: dict[str, tuple[Callable[[Sizes], Result], float, bool]] = {
    "bf16_forward": (check_bf16_forward, 60, True),
    "decode_graphs": (check_decode_graphs, 90, True),
    "train_checkpointing_then_sample": (check_train_checkpointing_then_sample, 90, True),
    "head_compiled": (check_head_compiled, 120, True),
    "head_cce": (check_head_cce, 60, True),
    "compile_time_n1": (check_compile_time_n1, 150, True),
    "compile_time_n12": (check_compile_time_n12, 150, True),
    "train_small_n3": (check_train_small_n3, 90, True),
    "memory_n12_all": (check_memory_n12_all, 90, True),
    "memory_n12_all_checkpointing": (check_memory_n12_all_checkpointing, 120, True),
    "decode_tps": (check_decode_tps, 90, True),
    "eval_n1": (check_eval_n1, 60, True),
    "train_base_n3": (check_train_base_n3, 180, False),
}

# figure -> (label, unit, target text, meets(value) or None)
FIGURES: dict[str, tuple[str, str, str, Callable[[float], bool] | None]] = {
    "small_n3_tokens_per_s": ("small N=3 compiled, training", "tok/s",
                              ">= 450,000 (authors 355k)", lambda v: v >= 450_000),
    "small_n3_mfu": ("small N=3 compiled, MFU", "%", "-", None),
    "base_n3_tokens_per_s": ("base N=3 compiled, training", "tok/s", "-", None),
    "base_n3_mfu": ("base N=3 compiled, MFU", "%", ">= 50% (authors 42.5%)",
                    lambda v: v >= 0.5),
    "memory_n12_all_plain_gib": ("small N=12 every-loop loss, peak", "GiB",
                                 "<= 24 (authors 32.7)", lambda v: v <= 24),
    "memory_n12_all_ckpt_gib": ("small N=12 every-loop loss + checkpointing, peak", "GiB",
                                "<= 24", lambda v: v <= 24),
    "compile_s_n1": ("compile time N=1", "s", "-", None),
    "compile_s_n12": ("compile time N=12", "s", "<= 1.3 x N=1", None),
    "decode_n1_b1_tokens_per_s": ("decode N=1 batch 1", "tok/s", "-", None),
    "decode_n1_b16_tokens_per_s": ("decode N=1 batch 16", "tok/s", "-", None),
    "decode_n12_b1_tokens_per_s": ("decode N=12 batch 1", "tok/s", ">= 300 (authors 19.6)",
                                   lambda v: v >= 300),
    "decode_n12_b16_tokens_per_s": ("decode N=12 batch 16", "tok/s", "-", None),
    "eval_n1_s": ("eval N=1 (bits per byte)", "s", "-", None),
    "eval_n1_tokens_per_s": ("eval N=1 (bits per byte)", "tok/s", "-", None),
    "head_eager_ms": ("head + loss, one loop, chunked eager", "ms", "-", None),
    "head_compiled_ms": ("head + loss, one loop, chunk body compiled", "ms",
                         "matmul-bound (~11 ms at 16k x 384 x 151,669 on an H100)", None),
    "cce_grad_weight_error": ("cut-cross-entropy grad weight, rel. error vs fp32", "",
                              "<= 2 x chunked bf16", None),
    "chunked_grad_weight_error": ("chunked bf16 grad weight, rel. error vs fp32", "", "-",
                                  None),
}


class CheckTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CheckTimeout


def run_check(name: str, sizes: Sizes, budget: float) -> tuple[Result, float]:
    """One check under its time budget; any exception is its FAIL, not the script's."""
    check = CHECKS[name][0]
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        result = check(sizes)
    except CheckTimeout:
        result = Result("FAIL", f"over its time budget of {budget:.0f} s")
    except Exception as exc:  # noqa: BLE001 - a failing check must not stop the others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result = Result("FAIL", f"{type(exc).__name__}: {first[:300]}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if sizes.cuda:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(sizes.device)
                torch.cuda.empty_cache()
    return result, time.perf_counter() - t0


def _value(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    unit = FIGURES[key][1]
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "tok/s":
        return f"{value:,.0f}"
    if unit == "":
        return f"{value:.2e}"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"


def print_table(figures: dict[str, float | None], cuda: bool) -> None:
    print("\n| figure | value | unit | target (H100, issue 24) | met |")
    print("|---|---:|---|---|---|")
    if "compile_s_n1" in figures and "compile_s_n12" in figures and figures["compile_s_n1"]:
        figures["compile_ratio"] = figures["compile_s_n12"] / figures["compile_s_n1"]
    for key, (label, unit, target, meets) in FIGURES.items():
        if key not in figures:
            continue
        value = figures[key]
        met = "-" if meets is None or value is None or not cuda else \
            ("yes" if meets(value) else "NO")
        if key == "compile_s_n12" and "compile_ratio" in figures:
            ratio = figures["compile_ratio"]
            target = f"{target} (now {ratio:.2f} x)"
            met = ("yes" if ratio <= 1.3 else "NO") if cuda else "-"
        print(f"| {label} | {_value(key, value)} | {unit} | {target} | {met} |")
    if not cuda:
        print("(CPU at toy sizes: the targets are GPU targets, shown for reference)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="run every check on CPU at toy sizes (the test suite does)")
    parser.add_argument("--only", default="", help=f"comma list of checks: {list(CHECKS)}")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds for the whole run; each check's budget is cut to what "
                             "is left (default 450: under 8 minutes with start-up)")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="training device batch (default: 16 on a GPU, 2 on CPU)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or \
        [n for n, (_, _, default) in CHECKS.items() if default]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only {unknown[0]!r} is not a check: choose from {list(CHECKS)}")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the CPU checks at toy sizes")
    sizes = cpu_sizes() if args.cpu else gpu_sizes(torch.device("cuda"))
    if args.batch_size:
        sizes.batch = args.batch_size
    name = torch.cuda.get_device_name(sizes.device) if sizes.cuda else "CPU (toy sizes)"
    print(f"# loopedlm GPU check: {name}, torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}" if sizes.cuda else "")
          + f", training batch {sizes.batch} x {sizes.config().sequence_len} tokens", flush=True)
    stance = contextlib.nullcontext() if sizes.cuda else \
        torch.compiler.set_stance("default", force_backend="eager")
    start, figures, failed = time.perf_counter(), {}, 0
    with stance:  # on CPU: dynamo's capture without code generation (seconds, not minutes)
        for check in names:
            left = args.deadline - (time.perf_counter() - start)
            budget = min(CHECKS[check][1] * sizes.budget, left)
            if left < 5:
                print(f"SKIP  {check:32s}         out of time (--deadline {args.deadline:.0f} s)",
                      flush=True)
                continue
            result, seconds = run_check(check, sizes, budget)
            failed += result.status == "FAIL"
            figures.update(result.figures)
            print(f"{result.status:5s} {check:32s} {seconds:6.1f} s  {result.detail}", flush=True)
    print_table(figures, sizes.cuda)
    print(f"\n{len(names) - failed} of {len(names)} checks without failure; "
          f"{time.perf_counter() - start:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
