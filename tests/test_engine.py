"""The decode engine (issue 11): the slot API, the static cache, per-row loop counts, the
shared first layer, the sync-free step (captured as a CUDA graph on GPUs; its capture
procedure and its freedom from host syncs are checked here on CPU) and the sampler."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from loopedlm import LoopedGPT
from loopedlm.infer import (
    AdaptiveLoops,
    DecodeEngine,
    SamplingParams,
    SequenceParams,
    batch_buckets,
    sample_rows,
    warm,
)
from loopedlm.infer.engine import StepKey, capture_step
from loopedlm.infer.sampling import uniform_noise

GREEDY = SamplingParams(temperature=0)
VARIANTS = {"mha": {}, "gqa": dict(n_head=4, n_kv_head=2), "mla": dict(attn_type="mla", kv_rank=8),
            "swa": dict(window_pattern="SL", sequence_len=16)}


def make_model(mode: str = "flt", variant: str = "mha", std: float = 0.1, **overrides
               ) -> LoopedGPT:
    return tiny_model(std=std, loop_mode=mode, **{**VARIANTS[variant], **overrides})


def prompt(seed: int, length: int, vocab: int = 61) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def seq(prompt_ids: list[int], **params) -> dict:
    """One request of `run_slots`: a prompt and its `SequenceParams`."""
    return dict(prompt_ids=prompt_ids, params=SequenceParams(**params))


def run_slots(engine: DecodeEngine, requests: dict[int, dict], n_steps: int) -> dict[int, list[int]]:
    """Add every request (slot -> `seq(...)`), step n_steps times; tokens per slot."""
    tokens = {slot: [int(engine.add(slot, **kw))] for slot, kw in requests.items()}
    for _ in range(n_steps):
        out = engine.step().tokens.tolist()
        for slot in requests:
            if out[slot] >= 0:
                tokens[slot].append(out[slot])
    return tokens


# ---- per-row loop counts, slots, buckets ---------------------------------------------------
@pytest.mark.parametrize("cache_slots", [None, 2])
@pytest.mark.parametrize("mode", ["lt", "flt"])
@torch.no_grad()
def test_rows_with_different_loop_counts_share_a_step_exactly(mode, cache_slots):
    """Rows at 1, 3 and 5 loops in one step give what each gives alone: each reads its
    own last loop, and its extra loops never touch cache entries it reads."""
    model = make_model(mode, "mha", std=0.3, sequence_len=32)
    loops = {0: 1, 1: 3, 2: 5}
    requests = {slot: seq(prompt(slot, 4 + 2 * slot), n_loops=n, sampling=GREEDY)
                for slot, n in loops.items()}
    engine = DecodeEngine(model, max_batch=4, max_loops=5, cache_slots=cache_slots)
    batched = run_slots(engine, requests, 6)
    for slot, kw in requests.items():
        alone = DecodeEngine(model, max_batch=1, max_loops=5, cache_slots=cache_slots)
        assert run_slots(alone, {0: kw}, 6)[0] == batched[slot]
    # and the logits of a teacher-forced step equal the full forward's at each row's N
    engine = DecodeEngine(model, max_batch=4, max_loops=5)
    ids = {slot: prompt(10 + slot, 6) for slot in loops}
    for slot, n in loops.items():
        engine.prefill(slot, ids[slot][:5], SequenceParams(n_loops=n))
    logits, spent = engine.decode(torch.tensor([ids[s][5] for s in loops] + [0]))
    assert spent[:3].tolist() == [1, 3, 5]
    for slot, n in loops.items():
        full = model(torch.tensor([ids[slot]]), n_loops=n)[0, -1]
        torch.testing.assert_close(logits[slot], full, atol=1e-4, rtol=0)  # (std 0.3: large logits)


@torch.no_grad()
def test_slots_join_and_leave_between_steps():
    """A sequence added mid-way, and a slot reused after release, decode as if alone."""
    model = make_model("flt", "gqa", sequence_len=32)
    kw_a = seq(prompt(1, 5), n_loops=3, sampling=GREEDY)
    kw_b = seq(prompt(2, 3), n_loops=2, sampling=GREEDY)
    alone_a = run_slots(DecodeEngine(model, max_batch=1, max_loops=3), {0: kw_a}, 6)[0]
    alone_b = run_slots(DecodeEngine(model, max_batch=1, max_loops=3), {0: kw_b}, 4)[0]
    engine = DecodeEngine(model, max_batch=4, max_loops=3)
    got_a = [int(engine.add(0, **kw_a))]
    got_a += [int(engine.step().tokens[0]) for _ in range(2)]
    got_b = [int(engine.add(3, **kw_b))]  # joins: the step's bucket grows from 1 to 4
    for _ in range(4):
        out = engine.step().tokens
        got_a.append(int(out[0]))
        got_b.append(int(out[3]))
    assert got_a == alone_a and got_b == alone_b
    engine.release(0)
    assert run_slots(engine, {0: kw_a}, 6)[0] == alone_a  # slot 0 reused, slot 3 still there


@pytest.mark.parametrize("adaptive", [None, AdaptiveLoops(0.5, "state")])
@torch.no_grad()
def test_free_slots_that_held_longer_sequences_do_not_break_a_step(adaptive):
    """Regression: a step computes every row of its bucket, free ones too, and attends over
    the open rows' longest length only. A free slot inside the bucket kept the position
    of the long sequence it last held, beyond the keys the step attends: the fixed step
    raised IndexError (and a package read out of bounds). Now the new sequences decode as
    they do alone."""
    model = make_model("flt", "gqa", sequence_len=160)
    params = SequenceParams(n_loops=3, sampling=GREEDY, adaptive=adaptive)
    engine = DecodeEngine(model, max_batch=4, max_len=160, max_loops=3)
    run_slots(engine, {slot: seq(prompt(slot, 4), n_loops=3, sampling=GREEDY)
                       for slot in range(4)}, 100)  # every slot past 64 positions
    engine.reset()
    fresh = {0: dict(prompt_ids=prompt(7, 5), params=params),
             3: dict(prompt_ids=prompt(8, 3), params=params)}  # slots 1 and 2 free, in the bucket
    got = run_slots(engine, fresh, 6)
    for slot, kw in fresh.items():
        assert got[slot] == run_slots(DecodeEngine(model, max_batch=1, max_len=160, max_loops=3),
                                      {0: kw}, 6)[0]


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]


# ---- the static cache and the shared first layer -------------------------------------------
@pytest.mark.parametrize("mode", ["flt", "ltai"])
@pytest.mark.parametrize("variant", ["mha", "mla"])
@torch.no_grad()
def test_shared_first_layer_gives_identical_logits_and_saves_its_loops(mode, variant):
    model = make_model(mode, variant, sequence_len=32)
    n_loops, ids = 4, torch.tensor(prompt(3, 12))
    results, sizes = [], []
    for share in (True, False):
        engine = DecodeEngine(model, max_batch=2, max_loops=n_loops, share_first_layer=share)
        params = SequenceParams(n_loops=n_loops)
        logits = [engine.prefill(0, ids[:6], params)]
        engine.prefill(1, ids[:3], params)
        for t in range(6, 12):
            logits.append(engine.decode(torch.stack([ids[t], ids[t - 3]]))[0][:1])
        results.append(torch.cat(logits))
        sizes.append(engine.cache.nbytes())
    assert torch.equal(results[0], results[1])
    cfg = model.config
    entry = 2 * 2 * cfg.n_kv_head * 32 * cfg.head_dim * 4  # (k, v) x batch x ... x fp32
    assert sizes[1] - sizes[0] == (n_loops - 1) * entry
    assert sizes[1] == n_loops * cfg.depth * entry


def test_first_layer_is_not_shared_where_it_depends_on_the_loop():
    for mode in ("lt", "lti", "flt_res"):
        engine = DecodeEngine(make_model(mode), max_batch=1, max_loops=3)
        assert not engine.cache.share_first_layer


@torch.no_grad()
def test_the_step_is_static_no_allocation_of_state_and_no_shape_change():
    model = make_model("flt", "swa")
    engine = DecodeEngine(model, max_batch=2, max_loops=2)
    state = engine.state
    tensors = [t for layer in engine.cache.entries for kv in layer for t in kv]
    tensors += [state.tokens, state.pos, state.finished, state.out_tokens]
    before = [(t.data_ptr(), t.shape) for t in tensors]
    engine.add(0, prompt(1, 4), SequenceParams(n_loops=2, sampling=GREEDY))
    engine.add(1, prompt(2, 7), SequenceParams(n_loops=1, sampling=SamplingParams(seed=3)))
    positions = []
    for _ in range(5):
        engine.step()
        positions.append(state.pos[:2].tolist())
    assert [(t.data_ptr(), t.shape) for t in tensors] == before
    assert positions == [[4 + i, 7 + i] for i in range(1, 6)]  # positions are per row


@torch.no_grad()
def test_graph_capture_procedure_replays_the_eager_step():
    """graphs=True runs the CUDA-graph capture procedure (warm-up steps, then the state
    put back); on CPU the replay is a plain call. Tokens must equal the eager engine's."""
    model = make_model("ltai", "gqa", std=0.3, sequence_len=32)
    requests = {0: seq(prompt(1, 5), n_loops=3, sampling=SamplingParams(seed=1)),
                1: seq(prompt(2, 9), n_loops=2, sampling=GREEDY, stop_ids=[7])}
    eager = run_slots(DecodeEngine(model, max_batch=2, max_loops=3, graphs=False), requests, 8)
    graphed = DecodeEngine(model, max_batch=2, max_loops=3, graphs=True)
    assert run_slots(graphed, requests, 8) == eager
    assert graphed.step_variants == 1  # captured once for the bucket, then replayed


@torch.no_grad()
def test_decode_step_compiles_as_one_graph_without_host_syncs():
    """A host sync (.item(), .tolist(), bool(tensor)) or a data-dependent shape in the step
    would break a full-graph compile (fullgraph=True raises on any graph break); the
    fixed-loop step must compile whole, and give the eager engine's tokens."""
    model = make_model("flt", "swa", sequence_len=32)
    requests = {0: seq(prompt(1, 5), n_loops=2,
                       sampling=SamplingParams(seed=1, top_k=5, top_p=0.9), stop_ids=[3]),
                1: seq(prompt(2, 3), n_loops=1, sampling=GREEDY)}
    eager = run_slots(DecodeEngine(model, max_batch=2, max_loops=2), requests, 2)
    torch._dynamo.reset()
    compiled = DecodeEngine(model, max_batch=2, max_loops=2, compile="step",
                            compile_options=dict(backend="eager", fullgraph=True))
    assert run_slots(compiled, requests, 2) == eager
    assert compiled.step_variants == 1
    torch._dynamo.reset()


def test_a_cpu_step_compiles_with_the_cpp_wrapper_unless_the_options_say_otherwise():
    """On a CPU the decode step's inductor compile uses the C++ wrapper (a step is hundreds
    of small kernels; the Python wrapper between them cost more than they did); a caller's
    own inductor options win, and other backends, a `mode` and CUDA are left alone."""
    from loopedlm.infer.engine import cpu_compile_options

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cpu_compile_options(cpu, None) == {"options": {"cpp_wrapper": True}}
    assert cpu_compile_options(cpu, {"fullgraph": True, "options": {"max_autotune": True}}) \
        == {"fullgraph": True, "options": {"cpp_wrapper": True, "max_autotune": True}}
    off = {"options": {"cpp_wrapper": False}}
    assert cpu_compile_options(cpu, off) == off
    for kept in ({"backend": "eager"}, {"backend": "aot_eager"}, {"mode": "max-autotune"}):
        assert cpu_compile_options(cpu, kept) == kept
    assert cpu_compile_options(cuda, None) == {}
    with pytest.raises(ValueError, match=r"compile_options='fast' is not allowed: a dict"):
        DecodeEngine(make_model(sequence_len=16), compile_options="fast")
    with pytest.raises(ValueError, match=r"compile_options\['options'\]=True is not allowed"):
        cpu_compile_options(cpu, {"options": True})
    engine = DecodeEngine(make_model("flt", "mha", sequence_len=16), max_batch=1,
                          compile="background")
    assert engine.compile_options == {"options": {"cpp_wrapper": True}}
    # the compile-warming process gets the same options, so it fills the caches this reads
    assert engine.warm_spec(StepKey(1, 1, 0, False, False, True)).compile_options \
        == engine.compile_options


@pytest.mark.slow
@torch.no_grad()
def test_the_inductor_compiled_cpu_step_gives_the_eager_tokens():
    """Inductor's own code on a CPU (the C++ wrapper, the default there), not the eager
    backend the other compile tests use: the compiled step's greedy and seeded tokens are
    the eager engine's."""
    model = make_model("flt", "gqa", sequence_len=32)
    requests = {0: seq(prompt(1, 5), n_loops=3,
                       sampling=SamplingParams(seed=1, top_k=5, top_p=0.9)),
                1: seq(prompt(2, 3), n_loops=3, sampling=GREEDY)}
    eager = run_slots(DecodeEngine(model, max_batch=2, max_loops=3), requests, 6)
    torch._dynamo.reset()
    compiled = DecodeEngine(model, max_batch=2, max_loops=3, compile="step")
    assert compiled.compile_options["options"]["cpp_wrapper"]
    assert run_slots(compiled, requests, 6) == eager
    torch._dynamo.reset()


@torch.no_grad()
def test_one_compiled_loop_serves_every_loop_in_two_graphs():
    """compile="loop": one decode loop compiled whole (fullgraph), two graphs (the first loop
    and every later one) whatever the loop count, and the eager engine's tokens."""
    from torch._dynamo.utils import counters

    model = make_model("flt", "mha", sequence_len=32)
    requests = {0: seq(prompt(1, 4), n_loops=4, sampling=GREEDY),
                1: seq(prompt(2, 2), n_loops=2, sampling=GREEDY)}
    eager = run_slots(DecodeEngine(model, max_batch=2, max_loops=4), requests, 4)
    torch._dynamo.reset()
    counters.clear()
    compiled = DecodeEngine(model, max_batch=2, max_loops=4, compile="loop",
                            compile_options=dict(backend="eager", fullgraph=True))
    assert run_slots(compiled, requests, 4) == eager
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


@torch.no_grad()
def test_adaptive_and_speculative_rows_run_the_compiled_loop_with_the_eager_tokens():
    """compile="loop": adaptive rows (leaving the batch as they converge) and speculative
    rows (drafts and a verify chunk) run the compiled loop too, so that they compare
    like-for-like with compiled fixed-loop rows, never stopped by the recompile limit; their
    tokens and loops spent are the eager engine's."""
    from torch._dynamo.utils import counters

    model = make_model("flt", "mha", std=0.3, sequence_len=48)
    adaptive = AdaptiveLoops(0.3, min_loops=2)
    requests = {0: seq(prompt(1, 4), n_loops=4, sampling=GREEDY, adaptive=adaptive),
                1: seq(prompt(2, 6), n_loops=4, sampling=GREEDY),
                2: seq(prompt(3, 3), n_loops=4, sampling=GREEDY, adaptive=adaptive),
                3: seq(prompt(4, 5), n_loops=4, sampling=GREEDY, draft_loops=1,
                       draft_tokens=3)}

    def run(engine):
        tokens = {slot: [int(engine.add(slot, **kw))] for slot, kw in requests.items()}
        loops = []
        for _ in range(8):
            out = engine.step()
            loops.append(out.loops.tolist())
            for slot, token in enumerate(out.tokens.tolist()):
                tokens[slot].append(token)
        return tokens, loops

    eager = run(DecodeEngine(model, max_batch=4, max_loops=4, compile=False))
    assert len({n for step in eager[1] for n in step[:3]}) > 1  # rows did stop early
    torch._dynamo.reset()
    counters.clear()
    compiled = DecodeEngine(model, max_batch=4, max_loops=4, compile="loop",
                            compile_options=dict(backend="eager", fullgraph=True))
    # their variants (a batch that shrinks, rows gathered, a chunk) exceed a low recompile
    # limit: the engine raises it rather than fall back to eager without a word
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        assert run(compiled) == eager
    assert counters["stats"]["unique_graphs"] > 2  # the loop ran compiled, in more graphs
    torch._dynamo.reset()


# ---- sampling ------------------------------------------------------------------------------
@torch.no_grad()
def test_a_seeded_row_samples_the_same_whatever_else_is_in_the_batch():
    model = make_model("flt", "mha", std=0.02, sequence_len=32)  # flat: sampling varies
    row = seq(prompt(1, 4), n_loops=2, sampling=SamplingParams(seed=11))
    alone = run_slots(DecodeEngine(model, max_batch=1, max_loops=2), {0: row}, 10)[0]
    others = {0: seq(prompt(2, 6), n_loops=1, sampling=SamplingParams(seed=5)),
              1: seq(prompt(3, 2), n_loops=2,
                     sampling=SamplingParams(temperature=0.7, top_k=9, top_p=0.8)),
              3: row}
    batched = run_slots(DecodeEngine(model, max_batch=4, max_loops=2), others, 10)
    assert batched[3] == alone
    other_seed = seq(prompt(1, 4), n_loops=2, sampling=SamplingParams(seed=12))
    assert run_slots(DecodeEngine(model, max_batch=1, max_loops=2), {0: other_seed}, 10)[0] \
        != alone


def test_uniform_noise_is_a_function_of_seed_and_counter():
    seed = torch.tensor([1, 1, 2, -5, 2**40])
    counter = torch.tensor([0, 1, 0, 0, 3])
    noise = uniform_noise(seed, counter, 1000)
    assert ((noise > 0) & (noise < 1)).all()
    assert torch.equal(noise, uniform_noise(seed, counter, 1000))
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert abs(noise.mean().item() - 0.5) < 0.02  # roughly uniform


def test_sampler_follows_the_softmax():
    """Gumbel-max over counter-based noise draws from softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    n = logits.size(0)
    tokens = sample_rows(logits, torch.full((n,), 0.5), torch.full((n,), 4),
                         torch.ones(n), torch.full((n,), 9), torch.arange(n), filtered=False)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, (logits[0] / 0.5).softmax(-1), atol=0.03, rtol=0)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 20), p=st.floats(0.01, 1.0),
       temperature=st.one_of(st.just(0.0), st.floats(0.05, 2.0)),
       seed=st.integers(0, 1000))
def test_sample_rows_stays_inside_top_k_and_top_p(k, p, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 20, generator=gen) * 3
    rows = logits.size(0)
    picks = torch.stack([
        sample_rows(logits, torch.full((rows,), temperature), torch.full((rows,), k),
                    torch.full((rows,), p), torch.arange(rows) + seed, torch.full((rows,), c))
        for c in range(10)], 1)
    for r in range(rows):
        if temperature == 0:
            assert set(picks[r].tolist()) == {int(logits[r].argmax())}
            continue
        scaled = logits[r] / temperature
        top = torch.topk(scaled, k).indices
        probs = scaled[top].softmax(-1)
        before = probs.cumsum(0) - probs
        allowed = set(top[before < p].tolist()) if p < 1 else set(top.tolist())
        assert set(picks[r].tolist()) <= allowed


def test_top_k_one_tiny_top_p_and_zero_temperature_are_greedy():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)

    def sample(temperature=1.0, top_k=30, top_p=1.0):
        return sample_rows(logits, torch.full((3,), temperature), torch.full((3,), top_k),
                           torch.full((3,), top_p), torch.arange(3), torch.zeros(3, dtype=torch.long))
    assert torch.equal(sample(top_k=1), greedy)
    assert torch.equal(sample(top_p=1e-9), greedy)
    assert torch.equal(sample(temperature=0.0), greedy)
    assert not torch.equal(sample(temperature=5.0), greedy)  # (and hot sampling is not greedy)


# ---- stop and length, batched ----------------------------------------------------------------
@torch.no_grad()
def test_stop_ids_and_budgets_finish_rows_on_the_device():
    model = make_model("flt", sequence_len=16)
    engine = DecodeEngine(model, max_batch=3, max_loops=2)
    free = run_slots(DecodeEngine(model, max_batch=1, max_loops=2),
                     {0: seq([1, 2], n_loops=2, sampling=GREEDY)}, 5)[0]
    engine.add(0, [1, 2], SequenceParams(n_loops=2, sampling=GREEDY, stop_ids=[free[2]]))
    engine.add(1, [1, 2], SequenceParams(n_loops=2, sampling=GREEDY, max_new_tokens=2))
    engine.add(2, prompt(4, 14), SequenceParams(n_loops=2, sampling=GREEDY))  # 16-14+1 fit
    rows = [[], [], []]
    for _ in range(4):
        out = engine.step()
        for r, (tok, done) in enumerate(zip(out.tokens.tolist(), out.finished.tolist(),
                                            strict=True)):
            rows[r].append((tok, done))
    assert rows[0][:2] == [(free[1], False), (free[2], True)] and rows[0][2][0] == -1
    assert rows[1][0] == (free[1], True) and rows[1][1][0] == -1
    assert [done for _, done in rows[2][:2]] == [False, True] and rows[2][2][0] == -1


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input_names_the_value():
    model = make_model("flt", sequence_len=16)
    engine = DecodeEngine(model, max_batch=2, max_loops=3)
    with pytest.raises(ValueError, match="prompt of 17 tokens is longer than the context"):
        engine.add(0, [1] * 17)
    with pytest.raises(ValueError, match="slot 2 is outside"):
        engine.add(2, [1])
    with pytest.raises(ValueError, match="n_loops=0"):
        engine.add(0, [1], SequenceParams(n_loops=0))
    with pytest.raises(ValueError, match="n_loops=4"):
        engine.add(0, [1], SequenceParams(n_loops=4))
    with pytest.raises(ValueError, match="unknown stop token 61"):
        engine.add(0, [1], SequenceParams(stop_ids=[61]))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        SequenceParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="token id 99"):
        engine.add(0, [1, 99])
    with pytest.raises(ValueError, match="no active slot"):
        engine.step()
    engine.add(0, [1, 2], SequenceParams(n_loops=2))
    with pytest.raises(ValueError, match="slot 0 is in use"):
        engine.add(0, [1])
    with pytest.raises(ValueError, match="max_batch=0"):
        DecodeEngine(model, max_batch=0)
    with pytest.raises(ValueError, match="compile='fast'"):
        DecodeEngine(model, compile="fast")


def test_a_failure_after_the_prefill_frees_the_slot(monkeypatch):
    """Issue 22, D1: an add that fails once its slot is taken gives the slot back."""
    import loopedlm.infer.engine as engine_module

    engine = DecodeEngine(make_model("flt", sequence_len=8), max_batch=1, max_loops=3)

    def overflow(*args, **kwargs):
        raise RuntimeError("value cannot be converted to type float without overflow")
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "sample_rows", overflow)
        with pytest.raises(RuntimeError, match="overflow"):
            engine.add(0, [1, 2], SequenceParams(n_loops=2))
    assert engine.active_slots == []
    engine.add(0, [1, 2], SequenceParams(n_loops=2))
    assert engine.active_slots == [0]


# ---- logprobs (issue 22, D11) ----------------------------------------------------------------
def check_logprobs(model, requests: dict[int, dict], n_steps: int, compile, slots) -> DecodeEngine:
    """Run `requests` (`run_slots`' form) n_steps steps and check that each of `slots` got,
    for every token, its log-probability and the 5 most likely tokens' under the model's
    distribution at its n_loops (the full forward's log-softmax). The engine, for more checks."""
    engine = DecodeEngine(model, max_batch=len(requests), max_loops=3, compile=compile,
                          compile_options=dict(backend="eager", fullgraph=True))
    tokens = {slot: [] for slot in requests}
    reported = {slot: [] for slot in requests}
    for slot, kw in requests.items():
        tokens[slot].append(int(engine.add(slot, **kw)))
        reported[slot].append(engine.output().host_logprobs()[slot])
    for _ in range(n_steps):
        out = engine.step()
        rows = out.host_logprobs()  # (every slot's)
        for slot, token in enumerate(out.tokens.tolist()):
            tokens[slot].append(token)
            reported[slot].append(rows[slot])
    for slot in slots:
        ids = requests[slot]["prompt_ids"]
        full = model(torch.tensor([ids + tokens[slot]]),
                     n_loops=requests[slot]["params"].n_loops)[0].float().log_softmax(-1)
        for i, (logprob, top) in enumerate(reported[slot]):
            expected = full[len(ids) - 1 + i]
            assert logprob == pytest.approx(expected[tokens[slot][i]].item(), abs=1e-4)
            values, best = expected.topk(5)
            assert [token for token, _ in top] == best.tolist()
            assert [value for _, value in top] == pytest.approx(values.tolist(), abs=1e-4)
    return engine


@pytest.mark.parametrize("compile", [False, "step"])
@torch.no_grad()
def test_logprobs_are_the_models_own_for_each_sampled_token(compile):
    """Rows that ask get each sampled token's log-probability and the 5 most likely tokens'
    under the model's distribution (the full forward's log-softmax), whatever else is in the
    batch; the step still compiles whole (no host sync: fullgraph=True raises on one)."""
    model = make_model("flt", "mha", sequence_len=32)
    requests = {0: seq(prompt(1, 4), n_loops=2, sampling=GREEDY, logprobs=3),
                1: seq(prompt(2, 3), n_loops=3, sampling=SamplingParams(seed=4, top_p=0.9),
                       logprobs=0),
                2: seq(prompt(3, 5), n_loops=1, sampling=GREEDY)}
    torch._dynamo.reset()
    check_logprobs(model, requests, 4, compile, slots=(0, 1))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="logprobs=6"):
        SequenceParams(logprobs=6)


@pytest.mark.parametrize("compile", [False, "step"])
@torch.no_grad()
def test_speculative_rows_report_the_n_loop_models_logprobs(compile):
    """A self-speculative row (draft_loops) that asks for logprobs gets, for each emitted
    token, the n_loops model's (from the verify pass): what plain decoding reports, beside a
    plain row that asks too."""
    model = make_model("flt", "mha", sequence_len=40)
    requests = {0: seq(prompt(1, 4), n_loops=3, sampling=GREEDY, draft_loops=1, draft_tokens=3,
                       logprobs=2),
                1: seq(prompt(2, 3), n_loops=2, sampling=GREEDY, logprobs=1),
                2: seq(prompt(3, 5), n_loops=3, sampling=SamplingParams(seed=4), draft_loops=2,
                       logprobs=0)}
    torch._dynamo.reset()
    engine = check_logprobs(model, requests, 9, compile, slots=(0, 1, 2))
    assert engine.speculation.rounds > 0
    torch._dynamo.reset()


# ---- CUDA graphs and dtypes, checked on CPU (issue 24) ---------------------------------------
class _FakeCuda:
    """Stand-ins for the torch.cuda calls of a graph capture, recording what they are given:
    on which device the capture runs, and into which memory pool it records."""

    def __init__(self):
        self.devices, self.streams, self.pools, self.replays = [], [], [], 0
        fake = self

        class Graph:
            def capture_begin(self, *pool):
                fake.pools.append(pool)

            def capture_end(self):
                pass

            def replay(self):
                fake.replays += 1

        self.CUDAGraph = Graph

    def device(self, device):
        self.devices.append(torch.device(device))
        return contextlib.nullcontext()

    def Stream(self, device=None):  # noqa: N802 (torch.cuda's name)
        self.streams.append(torch.device(device))
        return self

    def current_stream(self, device=None):
        self.streams.append(torch.device(device))
        return self

    def wait_stream(self, other):
        pass

    def stream(self, stream):
        return contextlib.nullcontext()


def test_graph_capture_runs_on_the_engines_device_into_the_given_pool(monkeypatch):
    """Serving on cuda:1 must capture on cuda:1 whatever device the thread has current; a
    capture records into the pool it is given (the engine gives all its captures its one
    pool, `torch.cuda.graph_pool_handle()`), with no synchronise and cache flush; the
    warm-up advances the state and the capture procedure puts it back."""
    fake = _FakeCuda()
    for name in ("device", "Stream", "current_stream", "stream", "CUDAGraph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    flushes = []  # torch.cuda.graph synchronises and empties the allocator's cache each time
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, name=name: flushes.append(name))
    state = [torch.zeros(3)]

    def body():
        state[0].add_(1)
    replay = capture_step(body, state, torch.device("cuda", 1), pool="the-pool")
    assert fake.devices == [torch.device("cuda", 1)]
    assert set(fake.streams) == {torch.device("cuda", 1)}
    assert fake.pools == [("the-pool",)]
    assert state[0].tolist() == [1, 1, 1]  # two warm-ups undone, then the capture's call
    replay()
    assert fake.replays == 1
    assert flushes == []


@torch.no_grad()
def test_a_bf16_model_decodes_on_cpu_without_autocast():
    """A bf16 model (no autocast anywhere) decodes in bf16: the cache, the additive masks and
    the RoPE tables follow the weights' dtype (a fp32 cache would make SDPA raise on the
    q/k dtype mismatch); its logits stay close to the fp32 model's, and its greedy tokens
    agree with the fp32 model's."""
    model = make_model("flt", "gqa", std=0.3, sequence_len=32)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    engine = DecodeEngine(bf16, max_batch=2, max_loops=3)
    assert engine.dtype == torch.bfloat16 and engine.model is bf16  # no cast copy
    ids = prompt(1, 9)
    engine.prefill(0, ids[:6], SequenceParams(n_loops=3))
    engine.prefill(1, ids[:4], SequenceParams(n_loops=3))
    logits, _ = engine.decode(torch.tensor([ids[6], ids[4]]))
    full = model(torch.tensor([ids[:7]]), n_loops=3)[0, -1]
    torch.testing.assert_close(logits[0].float(), full, atol=0.1, rtol=0.05)
    engine.reset()
    requests = {0: seq(ids, n_loops=3, sampling=GREEDY), 1: seq(ids[:5], n_loops=2, sampling=GREEDY)}
    tokens = run_slots(engine, requests, 6)
    fp32 = run_slots(DecodeEngine(model, max_batch=2, max_loops=3), requests, 6)
    agree = sum(a == b for slot in requests for a, b in zip(tokens[slot], fp32[slot], strict=True))
    assert agree >= 0.8 * sum(len(t) for t in fp32.values())  # bf16 rounding may flip a near-tie


@torch.no_grad()
def test_compile_background_switches_to_the_compiled_step_and_keeps_the_tokens(monkeypatch):
    """compile="background": a step variant runs eagerly until it has run AUTO_COMPILE_AFTER
    times, is then compiled on a worker thread, warmed on stand-ins of the step's tensors
    (the real ones are never touched by it), and later steps run compiled, with no
    recompile for the real tensors and the eager engine's tokens."""
    from torch._dynamo.utils import counters

    import loopedlm.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "AUTO_COMPILE_AFTER", 3)
    model = make_model("flt", "swa", sequence_len=32)
    requests = {0: seq(prompt(1, 5), n_loops=3, sampling=SamplingParams(seed=1, top_k=5)),
                1: seq(prompt(2, 3), n_loops=2, sampling=GREEDY)}
    eager = run_slots(DecodeEngine(model, max_batch=2, max_loops=3, compile=False),
                      requests, 12)
    torch._dynamo.reset()
    counters.clear()
    engine = DecodeEngine(model, max_batch=2, max_loops=3, compile="background",
                          compile_options=dict(backend="eager", fullgraph=True))
    tokens = {slot: [int(engine.add(slot, **kw))] for slot, kw in requests.items()}
    for step in range(12):
        out = engine.step().tokens.tolist()
        for slot in requests:
            tokens[slot].append(out[slot])
        if step == 3:  # the compile started after the third run
            assert engine.wait_compiled(60)
    assert tokens == eager
    assert engine.compiled_steps == 1
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, on the stand-ins
    torch._dynamo.reset()


# ---- compile="auto" on a CPU: compiled where it pays, warmed for later runs ------------------
@pytest.fixture
def compile_home(tmp_path, monkeypatch):
    """torch.compile's caches and loopedlm's warm markers in a temporary folder."""
    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_compile"))
    return tmp_path


def test_compile_caches_live_under_loopedlm_home_though_torch_set_its_default(tmp_path):
    """Building a model makes torch set TORCHINDUCTOR_CACHE_DIR to its /tmp default; the
    engine's caches still go under $LOOPEDLM_HOME unless the user chose a folder."""
    code = ("import os; from loopedlm import LoopedGPT, ModelConfig; "
            "from loopedlm.common.paths import use_compile_cache; "
            "LoopedGPT.from_config(ModelConfig.preset('tiny'), seed=0); "
            "print(use_compile_cache()); print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(LOOPEDLM_HOME=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(tmp_path / "torch_compile")] * 2
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(tmp_path / "mine")] * 2


def test_a_compile_pays_when_the_steps_left_save_more_than_it_costs():
    # a compiled step takes 0.4 of an eager one: 100 steps of 0.1 s save 6 s
    assert warm.COMPILED_SHARE == 0.4
    assert warm.compile_pays(100, 0.1, 5.9)
    assert not warm.compile_pays(100, 0.1, 6.1)
    assert not warm.compile_pays(0, 0.1, 0.5)
    assert warm.compile_pays(math.inf, 0.001, 30.0)  # a server: unbounded steps


def test_warm_markers_name_the_spec_and_record_a_warm_compiles_seconds(compile_home):
    engine = DecodeEngine(make_model(), max_batch=2, max_loops=3)
    one = engine.warm_spec(StepKey(1, 3, 64, False, False, True))
    assert one == engine.warm_spec(StepKey(1, 3, 128, False, False, True))  # any key length
    other = engine.warm_spec(StepKey(2, 3, 64, False, False, True))
    assert one.signature() != other.signature()
    assert warm.WarmSpec.from_json(one.to_json()) == one
    assert warm.warm_seconds(one) is None
    warm.record(one)
    assert warm.warm_seconds(one) == warm.DEFAULT_WARM_SECONDS
    warm.record(one, 3.5)
    assert warm.warm_seconds(one) == 3.5
    assert warm.warm_seconds(other) is None
    assert (compile_home / "torch_compile" / "loopedlm_warm").is_dir()


def test_warming_is_off_when_asked_warm_already_or_under_way(compile_home, monkeypatch):
    engine = DecodeEngine(make_model(), max_batch=1, max_loops=3)
    spec = engine.warm_spec(StepKey(1, 3, 0, False, False, True))
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    assert not warm.start_warming(spec)
    monkeypatch.setenv(warm.WARMUP_ENV, "1")
    lock = warm.markers_dir() / f"{spec.signature()}.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()  # another process is warming it
    assert not warm.start_warming(spec)
    lock.unlink()
    other = warm.markers_dir() / "another-spec.lock"
    other.touch()  # one warming process at a time
    assert not warm.start_warming(spec)
    other.unlink()
    warm.record(spec)
    assert not warm.start_warming(spec)


def test_a_warming_process_that_fails_marks_nothing_and_frees_its_lock(compile_home, monkeypatch):
    """The process is started (detached, low priority) and its lock is removed however it
    ends; a spec it cannot compile (an unknown config field) is never marked warm."""
    monkeypatch.setenv(warm.WARMUP_ENV, "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    engine = DecodeEngine(make_model(), max_batch=1, max_loops=3)
    spec = engine.warm_spec(StepKey(1, 3, 0, False, False, True))
    broken = replace(spec, config={**spec.config, "no_such_field": 1})
    assert warm.start_warming(broken)
    lock = warm.markers_dir() / f"{broken.signature()}.lock"
    deadline = time.monotonic() + 120
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not lock.exists()
    assert warm.warm_seconds(broken) is None
    assert "no_such_field" in (warm.markers_dir() / f"{broken.signature()}.log").read_text()


@torch.no_grad()
@pytest.mark.parametrize("long_lived,warm_seconds,compiled", [
    (True, 1e9, 1),    # a server: unbounded steps repay any compile
    (False, 1e-3, 1),  # 12 tokens left repay a cheap compile
    (False, 1e9, 0),   # but not a dear one
])
def test_auto_on_a_cpu_compiles_a_warm_variant_only_where_it_pays(compile_home, monkeypatch,
                                                                   long_lived, warm_seconds,
                                                                   compiled):
    """compile="auto" on a CPU: with the variant marked warm, the engine compiles it (at
    once) once the steps left (a server's: unbounded; else the token budget) repay
    its compile, and the tokens stay the eager engine's. Nothing is warmed in a process."""
    import loopedlm.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "AUTO_COMPILE_AFTER", 3)
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    model = make_model(sequence_len=32)
    requests = {0: seq(prompt(1, 5), n_loops=3, sampling=GREEDY, max_new_tokens=13)}
    eager = run_slots(DecodeEngine(model, max_batch=1, max_loops=3, compile=False), requests, 12)
    torch._dynamo.reset()
    engine = DecodeEngine(model, max_batch=1, max_loops=3, long_lived=long_lived,
                          compile_options=dict(backend="eager", fullgraph=True))
    warm.record(engine.warm_spec(StepKey(1, 3, 0, False, False, True)), warm_seconds)
    tokens = {slot: [int(engine.add(slot, **kw))] for slot, kw in requests.items()}
    for step in range(12):
        tokens[0].append(engine.step().tokens.tolist()[0])
        if step == 3:
            assert engine.wait_compiled(120)
    assert tokens == eager
    assert engine.compiled_steps == compiled
    torch._dynamo.reset()


@torch.no_grad()
def test_auto_on_a_cpu_never_compiles_a_cold_variant_in_process(compile_home, monkeypatch):
    """A variant this machine never compiled stays eager in this process (its compile would
    compete with decoding), however long the engine lives."""
    import loopedlm.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "AUTO_COMPILE_AFTER", 2)
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    engine = DecodeEngine(make_model(sequence_len=32), max_batch=1, max_loops=3, long_lived=True)
    run_slots(engine, {0: seq(prompt(1, 5), n_loops=3, sampling=GREEDY)}, 12)
    assert engine.wait_compiled(10)
    assert engine.compiled_steps == 0


@contextlib.contextmanager
def host_syncs():
    """The host syncs made inside the block (.item(), .tolist(), bool(tensor): each waits
    for the device on a GPU), as a list of their names."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__")}

    def counted(name, method):
        def call(self, *args, **kwargs):
            calls.append(name)
            return method(self, *args, **kwargs)
        return call
    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, counted(name, method))
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@torch.no_grad()
def test_a_masked_forward_makes_no_host_sync():
    """Ragged prompts (left padding, an attention mask) go through the model with no host
    sync: no `bool(k_valid.all())` on each masked forward."""
    model = make_model("flt", "gqa", std=0.3, sequence_len=32)
    idx = torch.tensor([prompt(1, 8), prompt(2, 8)])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    with host_syncs() as calls:
        model(idx, attention_mask=mask, n_loops=3)
    assert calls == []


@pytest.mark.parametrize("threshold, loops", [(0.0, 6), (1e9, 2)])
@torch.no_grad()
def test_adaptive_decoding_syncs_once_per_loop_that_may_stop_a_row(threshold, loops):
    """Adaptive loops learn on the host which rows stop: one sync per loop from min_loops on,
    none before it and none at a loop that is every row's last (was about 5 per loop).
    Threshold 0: no row converges, every row runs its 6 loops (syncs at loops 2..5);
    a huge threshold: every row stops at min_loops=2 (one sync)."""
    model = make_model("flt", "mha", std=0.3, sequence_len=32)
    engine = DecodeEngine(model, max_batch=4, max_loops=6, compile=False)
    for slot in range(4):
        engine.add(slot, prompt(slot, 4), SequenceParams(
            n_loops=6, sampling=GREEDY, adaptive=AdaptiveLoops(threshold, min_loops=2)))
    engine.step()
    with host_syncs() as calls:
        out = engine.step()
    assert out.loops.tolist() == [loops] * 4
    assert len(calls) == (4 if loops == 6 else 1)


class _Ops(TorchDispatchMode):
    """The aten ops dispatched inside the block, by name, views and other metadata-only
    ops left out (they launch no kernel)."""

    METADATA = {"view", "_unsafe_view", "t", "slice", "transpose", "select", "unsqueeze",
                "split", "expand", "as_strided", "permute", "squeeze", "detach", "alias"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.METADATA:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_a_decode_loop_adds_only_the_layers_kernels_and_no_mask_work():
    """The masks are built once per step (additive biases) and q/k/v are one fused
    projection: each extra loop adds the layers' own kernels only, no mask op (no
    bitwise op, where, masked_fill or dtype conversion per layer), and at most 34 kernels
    per layer (about 35 before; 4 loops more of a 2-layer model here)."""
    model = make_model("flt", "mha", std=0.3, sequence_len=32)
    counts = {}
    for n_loops in (2, 6):
        engine = DecodeEngine(model, max_batch=2, max_loops=n_loops, compile=False)
        for slot in range(2):
            engine.add(slot, prompt(slot, 3 + slot), SequenceParams(n_loops=n_loops,
                                                                    sampling=GREEDY))
        engine.step()
        with _Ops() as ops:
            engine.step()
        counts[n_loops] = ops.counts
    extra = {name: counts[6].get(name, 0) - counts[2].get(name, 0) for name in counts[6]}
    mask_ops = {"bitwise_and", "bitwise_or", "bitwise_not", "where", "masked_fill",
                "_to_copy", "logical_and", "logical_or", "eq", "lt", "le", "ge", "gt"}
    assert {name: n for name, n in extra.items() if name in mask_ops and n} == {}
    per_layer = sum(extra.values()) / (4 * model.config.depth)
    assert per_layer <= 34, extra


# ---- several prompts prefilled together (add_many) -----------------------------------------
def _steps_after(engine: DecodeEngine, n_steps: int) -> list[list[int]]:
    out = [engine.output().tokens.tolist()]
    return out + [engine.step().tokens.tolist() for _ in range(n_steps)]


@pytest.mark.parametrize("mode,variant", [("flt", "mha"), ("lt", "gqa"), ("ltai", "swa"),
                                          ("flt_res", "mla")])
def test_add_many_prefills_prompts_together_as_adding_them_one_by_one(mode, variant):
    """Prompts of different lengths (right-padded in one pass per loop count) give the
    tokens, and the cache entries of every real position, that adding them one by one
    gives; the prompts that share a loop count run their loops once, together."""
    model = make_model(mode, variant, std=0.3)
    requests = [(0, prompt(1, 5), SequenceParams(n_loops=3, sampling=GREEDY)),
                (1, prompt(2, 9), SequenceParams(n_loops=3, sampling=SamplingParams(
                    temperature=0.9, seed=4))),
                (2, prompt(3, 3), SequenceParams(n_loops=2, sampling=GREEDY)),
                (3, prompt(4, 7), SequenceParams(n_loops=3, sampling=GREEDY,
                                                 max_new_tokens=4))]
    one_by_one = DecodeEngine(model, max_batch=4, max_loops=3, max_len=16, compile=False)
    together = DecodeEngine(model, max_batch=4, max_loops=3, max_len=16, compile=False)
    for slot, ids, params in requests:
        one_by_one.add(slot, ids, params)
    loops = []
    original = type(model).loop

    def counted(self, *args, **kwargs):
        loops.append(args[0].embedded.size(0))  # rows of the pass
        return original(self, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "loop", counted)
        assert together.add_many(requests) == [None] * 4
    assert loops == [3] * 3 + [1] * 2  # the three 3-loop prompts together, then the other
    assert _steps_after(together, 6) == _steps_after(one_by_one, 6)
    for (k1, v1), (k2, v2) in zip(one_by_one.cache.stores, together.cache.stores, strict=True):
        for slot, ids, _ in requests:
            real = slice(0, len(ids) + 6)
            torch.testing.assert_close(k2[:, slot, :, real], k1[:, slot, :, real], atol=1e-5,
                                       rtol=0)
            torch.testing.assert_close(v2[:, slot, :, real], v1[:, slot, :, real], atol=1e-5,
                                       rtol=0)


def test_add_many_refuses_a_bad_request_alone_and_a_failed_pass_frees_every_slot():
    """Each bad request gets its own clear error and leaves its slot free while the others
    start; a pass that raises leaves every slot of the call free (nothing half-added)."""
    model = make_model()
    engine = DecodeEngine(model, max_batch=4, max_loops=3, max_len=8, compile=False)
    engine.add(3, prompt(0, 2), SequenceParams(n_loops=2))
    good = SequenceParams(n_loops=2, sampling=GREEDY)
    errors = engine.add_many([
        (0, prompt(1, 4), good),
        (9, prompt(2, 4), good),  # no such slot
        (3, prompt(3, 4), good),  # in use
        (1, prompt(4, 9), good),  # longer than max_len=8
        (0, prompt(5, 4), good),  # slot 0 again in this call
        (2, [1, 2, 10**6], good),  # not a token id
        (1, prompt(6, 4), SequenceParams(n_loops=4)),  # over max_loops=3
        (2, prompt(7, 3), good),
    ])
    assert errors[0] is None and errors[7] is None
    for i, words in [(1, ["slot 9", "[0, 4)"]), (2, ["slot 3", "in use"]),
                     (3, ["9 tokens", "max_len=8"]), (4, ["slot 0", "in use"]),
                     (5, ["token id 1000000"]), (6, ["n_loops=4", "max_loops"])]:
        assert isinstance(errors[i], ValueError), i
        assert all(w in str(errors[i]) for w in words), (i, errors[i])
    assert engine.active_slots == [0, 2, 3]
    for slot in (0, 2):
        engine.release(slot)

    def broken(*args, **kwargs):
        raise RuntimeError("injected")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_prompts_logits", broken)
        with pytest.raises(RuntimeError, match="injected"):
            engine.add_many([(0, prompt(1, 4), good), (1, prompt(2, 4), good),
                             (2, prompt(3, 3), SequenceParams(n_loops=3))])
    assert engine.active_slots == [3]


def test_prefill_many_gives_each_prompts_last_logits_as_prefill_does():
    """`prefill_many` (no token sampled) opens the slots and returns what `prefill` returns
    last for each prompt; a refused request comes back as its error, in its place."""
    model = make_model("flt", "gqa", std=0.3)
    requests = [(0, prompt(1, 6), SequenceParams(n_loops=3)), (1, prompt(2, 2), None),
                (2, [], SequenceParams(n_loops=3)), (3, prompt(3, 4), SequenceParams(n_loops=3))]
    alone = DecodeEngine(model, max_batch=4, max_loops=3, max_len=8, compile=False)
    expected = [alone.prefill(slot, ids, params)[-1] for slot, ids, params in requests
                if ids]
    together = DecodeEngine(model, max_batch=4, max_loops=3, max_len=8, compile=False)
    got = together.prefill_many(requests)
    assert isinstance(got[2], ValueError) and "empty" in str(got[2])
    for logits, want in zip([got[0], got[1], got[3]], expected, strict=True):
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    assert together.active_slots == [0, 1, 3]
    assert together.state.pos[:4].tolist() == [6, 2, 0, 4]


def test_adaptive_rows_gather_some_rows_and_scatter_their_loop_results_back():
    """`AdaptiveRows.gathered` copies some rows of the batch (what a later loop over fewer
    rows takes) and `scatter` writes their loop results (previous and final states,
    looping, loops spent) back to those rows only; gathering gathered rows is refused."""
    from loopedlm.infer.engine import AdaptiveRows

    batch, d = 4, 3

    def rows(fill: float) -> AdaptiveRows:
        return AdaptiveRows(torch.arange(batch), torch.arange(batch) + 10,
                            torch.full((batch,), 4), torch.full((batch,), 2),
                            torch.full((batch,), 0.1), torch.tensor([1]),
                            torch.full((batch, 1, d), fill), torch.ones(batch, dtype=torch.bool),
                            torch.full((batch, 1, d), fill), torch.zeros(batch, dtype=torch.long))

    every = rows(0.0)
    some = every.gathered(torch.tensor([3, 1]))
    assert some.pos.tolist() == [13, 11] and some.loop is every.loop
    assert some.final.shape == (2, 1, d) and some.index.tolist() == [3, 1]
    some.final.fill_(5.0)
    some.previous.fill_(6.0)
    some.spent.copy_(torch.tensor([3, 2]))
    some.looping.copy_(torch.tensor([False, True]))
    assert every.final.abs().sum() == 0  # a copy until scattered
    some.scatter(every)
    assert every.spent.tolist() == [0, 2, 0, 3]
    assert every.looping.tolist() == [True, True, True, False]
    assert every.final[:, 0, 0].tolist() == [0.0, 5.0, 0.0, 5.0]
    assert every.previous[:, 0, 0].tolist() == [0.0, 6.0, 0.0, 6.0]
    assert len(some.tensors()) == len(every.tensors()) + 1  # the index travels too
    with pytest.raises(ValueError, match="gathered already"):
        some.gathered(torch.tensor([0]))
