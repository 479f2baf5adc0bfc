"""Generation (issue 6): sampling, streaming, stop tokens, ragged batches, adaptive loops,
shared cache slots, bad input and the `loopedlm sample` command."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given
from hypothesis import strategies as st
from reference_decoding import ReferenceCache, decode_step, prefill

from loopedlm import LoopedGPT
from loopedlm.infer.cache import loop_slot_map
from loopedlm.infer.engine import AdaptiveLoops, DecodeEngine, SequenceParams
from loopedlm.infer.generate import DEFAULT_MAX_TOKENS, decode_nll, generate, stream


def make_model(mode: str = "flt", seed: int = 0, std: float = 0.1, **overrides) -> LoopedGPT:
    """Tiny model with random non-zero weights, full attention, a 32-token context."""
    return tiny_model(seed, std=std, loop_mode=mode, **{"sequence_len": 32, **overrides})


class ByteTokenizer:
    """A stand-in tokenizer: one token per byte, BOS = 256 (the shared contract's API)."""

    vocab_size, bos_id = 257, 256
    special_ids = {256}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# ---- sampling ---------------------------------------------------------------------------
@torch.no_grad()
def test_greedy_generation_equals_argmax_of_full_recomputation():
    model = make_model("lti")
    prompt = [3, 14, 15, 9, 2]
    out = generate(model, prompt, max_tokens=8, temperature=0, n_loops=4)
    seq = list(prompt)
    for tok in out.tokens[0]:
        expected = model(torch.tensor([seq]), n_loops=4)[0, -1].argmax().item()
        assert tok == expected
        seq.append(tok)
    assert out.finish_reasons == ["length"] and out.loops == [[4] * 8]


def test_a_reused_engine_generates_what_a_fresh_one_does():
    # one long-lived engine across calls (no new cache, cast copy or graph capture per call):
    # every call equals a call with its own engine, whatever the previous call left in it
    model = make_model("flt")
    engine = DecodeEngine(model, max_batch=3, max_len=24, max_loops=4)
    calls = [dict(prompts=[[1, 2, 3], [4, 5]], max_tokens=6, seed=3, n_loops=4),
             dict(prompts=[5, 6, 7, 8], max_tokens=9, temperature=0, n_loops=2),
             dict(prompts=[[9], [8, 7], [6, 5, 4]], max_tokens=5, seed=11, n_loops=3,
                  adaptive_threshold=0.0)]
    for call in calls:
        prompts = call.pop("prompts")
        fresh = generate(model, prompts, **call)
        reused = generate(model, prompts, engine=engine, **call)
        assert reused.tokens == fresh.tokens and reused.loops == fresh.loops
        assert [s.tokens for s in stream(model, prompts, engine=engine, **call)] == \
            [s.tokens for s in stream(model, prompts, **call)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_reused_engine_follows_the_weights_as_they_train(dtype):
    """An engine kept across training steps (the trainer's) decodes with the weights of
    the moment: its fused projections, and its cast copy when it has one, are brought up to
    date as each sequence starts. The model's own parameters and keys are left alone."""
    model = make_model("flt")
    keys, params = list(model.state_dict()), [p.clone() for p in model.parameters()]
    engine = DecodeEngine(model, max_batch=1, max_len=24, max_loops=3, dtype=dtype)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]])).backward()
        optimizer.step()
        fresh = generate(model, [1, 2, 3], max_tokens=8, temperature=0, n_loops=3,
                         dtype=dtype)
        reused = generate(model, [1, 2, 3], max_tokens=8, temperature=0, n_loops=3,
                          engine=engine)
        assert reused.tokens == fresh.tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=30), "at most 16 positions"),
    (dict(n_loops=5), "n_loops=5 is not allowed: an integer in \\[1, 4\\]"),
    (dict(prompts=[[1], [2], [3]]), "at most 2 prompts"),
    (dict(dtype=torch.float64), "belong to the DecodeEngine"),
    (dict(cache_slots=2), "belong to the DecodeEngine"),
])
def test_a_reused_engine_that_cannot_serve_the_call_is_a_value_error(kwargs, match):
    model = make_model("flt")
    engine = DecodeEngine(model, max_batch=2, max_len=16, max_loops=4)
    prompts = kwargs.pop("prompts", [1, 2, 3])
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, engine=engine, **{"max_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="built for this model"):
        generate(make_model("flt"), [1, 2], engine=engine, max_tokens=2)


def test_same_seed_same_text_and_different_seed_differs():
    model = make_model(std=0.02)  # flat distributions: sampling really varies
    a = generate(model, [1, 2, 3], max_tokens=12, seed=7)
    b = generate(model, [1, 2, 3], max_tokens=12, seed=7)
    c = generate(model, [1, 2, 3], max_tokens=12, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_max_tokens_has_one_default_the_openai_one():
    from loopedlm.infer.server import CompletionRequest

    model = make_model("flt")
    out = generate(model, [1, 2], temperature=0)
    assert DEFAULT_MAX_TOKENS == 16 == len(out.tokens[0])
    assert CompletionRequest(prompt="x").max_tokens == DEFAULT_MAX_TOKENS


# ---- batching, stopping, streaming -------------------------------------------------------
@torch.no_grad()
def test_ragged_batch_generates_what_each_prompt_generates_alone():
    model = make_model("ltai", window_pattern="SL", sequence_len=32)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [4], [20, 21, 22]]
    batch = generate(model, prompts, max_tokens=6, temperature=0)
    for r, prompt in enumerate(prompts):
        alone = generate(model, prompt, max_tokens=6, temperature=0)
        assert batch.tokens[r] == alone.tokens[0]


def test_stop_token_ends_the_row_and_is_not_emitted():
    model = make_model("flt")
    free = generate(model, [1, 2], max_tokens=10, temperature=0).tokens[0]
    stop = free[3]
    cut = free.index(stop)
    out = generate(model, [1, 2], max_tokens=10, temperature=0, stop=[stop])
    assert out.tokens[0] == free[:cut]
    assert out.finish_reasons == ["stop"]


def test_stream_yields_the_tokens_generate_returns():
    model = make_model("lt")
    opts = dict(max_tokens=7, seed=3)
    events = list(stream(model, [[1, 2], [3]], **opts))
    result = generate(model, [[1, 2], [3]], **opts)
    assert len(events) == 7
    streamed = [[e.tokens[r] for e in events if e.tokens[r] is not None] for r in range(2)]
    assert streamed == result.tokens
    assert all(events[-1].done)


def test_text_prompts_stop_strings_and_context_limit():
    tok = ByteTokenizer()
    model = make_model("flt", vocab_size=257, sequence_len=16)
    out = generate(model, ["hi there"], tokenizer=tok, max_tokens=50, temperature=0)
    # 9 prompt tokens (BOS + 8 bytes): 16 - 9 + 1 tokens fit in the context
    assert len(out.tokens[0]) == 8 and out.finish_reasons == ["context"]
    assert out.texts == [tok.decode(out.tokens[0])]
    first = out.tokens[0][0]
    if first < 128:  # a one-byte character is a single token, so it works as a stop string
        stopped = generate(model, "hi there", tokenizer=tok, max_tokens=5, temperature=0,
                           stop=chr(first))
        assert stopped.tokens == [[]] and stopped.finish_reasons == ["stop"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[list(range(1, 40))]), "longer than the model's context"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[]), "empty"),
    (dict(prompts=[[1, 99]]), "token id 99"),
    (dict(frequency_penalty=1.0), "unknown generation option"),
    (dict(n_loops=0), "n_loops=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(stop=[999]), "unknown stop token 999"),
    (dict(stop="x"), "stop='x'"),
    (dict(adaptive_threshold=-0.1), "adaptive_threshold=-0.1"),
    (dict(adaptive_threshold=0.1, adaptive_criterion="entropy"), "entropy"),
    (dict(adaptive_prompt=True), "adaptive_prompt=True needs an adaptive_threshold"),
    (dict(adaptive_threshold=0.1, adaptive_prompt=1), "adaptive_prompt=1 is not allowed"),
    (dict(cache_slots=0), "cache_slots=0"),
    (dict(cache_slots=1, slot_policy="random"), "random"),
])
def test_bad_input_is_a_value_error_naming_the_value(kwargs, match):
    model = make_model()
    kwargs = {"prompts": [[1, 2]], **kwargs}
    prompts = kwargs.pop("prompts")
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, prompts, **kwargs)


def test_multi_token_stop_string_is_rejected():
    model = make_model(vocab_size=257)
    with pytest.raises(ValueError, match="'ab' is not a single token"):
        generate(model, "x", tokenizer=ByteTokenizer(), stop="ab")


# ---- adaptive loops -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lt", "lti", "ltai", "flt_res", "flt"])
@torch.no_grad()
def test_adaptive_with_zero_threshold_is_the_exact_fixed_decode(mode):
    model = make_model(mode)
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    fixed = decode_nll(model, idx, n_loops=4)
    adaptive = decode_nll(model, idx, n_loops=4, adaptive=AdaptiveLoops(0.0))
    full = model(idx[:, :-1], idx[:, 1:], n_loops=4)
    torch.testing.assert_close(fixed.nll.mean(), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(adaptive.nll, fixed.nll, atol=1e-5, rtol=0)
    assert (adaptive.loops == 4).all()


@pytest.mark.parametrize("mode", ["lt", "flt"])
@torch.no_grad()
def test_converged_token_skips_loops_and_fills_their_cache_entries(mode):
    """With an infinite threshold every token stops after min_loops: its logits are those
    of the model run at that loop count (loop t depends on loops <= t only), the blocks ran
    only min_loops times, and the skipped loops' entries hold the last computed loop's."""
    model = make_model(mode)
    n_loops, min_loops = 5, 2
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    engine = DecodeEngine(model, max_batch=2, max_loops=n_loops, share_first_layer=False)
    params = SequenceParams(n_loops=n_loops,
                            adaptive=AdaptiveLoops(float("inf"), min_loops=min_loops))
    for r in range(2):
        engine.prefill(r, idx[r, :8], params)
    rows_run = []
    hook = model.transformer.h[0].register_forward_hook(
        lambda m, inp, out: rows_run.append(inp[0].size(0)))
    logits, spent = engine.decode(idx[:, 8])
    hook.remove()
    assert spent.tolist() == [min_loops, min_loops]
    assert rows_run == [2] * min_loops
    expected = model(idx, n_loops=min_loops)[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    for layer in range(model.config.depth):
        last_k, last_v = engine.cache.entry(min_loops - 1, layer)
        for loop in range(min_loops, n_loops):
            k, v = engine.cache.entry(loop, layer)
            assert torch.equal(k[:2, :, 8], last_k[:2, :, 8])
            assert torch.equal(v[:2, :, 8], last_v[:2, :, 8])


def _adaptive_both_ways(model, idx, n_loops, adaptive):
    """Logits and loops of every decoded position, from the engine and from the reference
    decoder: (ours, our loops, theirs, their loops), each stacked over the positions."""
    batch, prompt = idx.size(0), 4
    engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops)
    params = SequenceParams(n_loops=n_loops, adaptive=adaptive)
    for r in range(batch):
        engine.prefill(r, idx[r, :prompt], params)
    cache = ReferenceCache()
    prefill(model, idx[:, :prompt], cache, n_loops)
    ours, theirs = [], []
    for t in range(prompt, idx.size(1)):
        ours.append(engine.decode(idx[:, t]))
        theirs.append(decode_step(model, idx[:, t], cache, n_loops, adaptive))
    return (torch.stack([o[0] for o in ours]), torch.stack([o[1] for o in ours]),
            torch.stack([o[0] for o in theirs]), torch.stack([o[1] for o in theirs]))


@pytest.mark.parametrize("criterion", ["state", "kl"])
@pytest.mark.parametrize("mode", ["lt", "flt"])
@torch.no_grad()
def test_adaptive_decoding_equals_the_reference_decoder(mode, criterion):
    """The engine's adaptive step (rows leave the batch, skipped loops' entries filled)
    gives the plain reference decoder's logits and loops, token after token, at a
    threshold where rows stop at different loops."""
    model = make_model(mode, std=0.3)
    idx = torch.randint(0, model.config.vocab_size, (3, 12),
                        generator=torch.Generator().manual_seed(7))
    for threshold in [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4]:
        ours, our_loops, theirs, their_loops = _adaptive_both_ways(
            model, idx, 6, AdaptiveLoops(threshold, criterion))
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert torch.equal(our_loops, their_loops)
        if len(set(our_loops.flatten().tolist())) > 1:
            return
    pytest.fail("no threshold gave rows different loop counts")


@pytest.mark.parametrize("mode", ["lt", "flt"])
@torch.no_grad()
def test_the_reference_decoder_equals_the_full_forward(mode):
    """The oracle of the adaptive tests, checked itself: without adaptive loops it gives
    the full forward's logits."""
    model = make_model(mode)
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    cache = ReferenceCache()
    logits = [prefill(model, idx[:, :5], cache, 3)]
    logits += [decode_step(model, idx[:, t], cache, 3)[0][:, None] for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(logits, 1), model(idx, n_loops=3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("criterion", ["state", "kl"])
@torch.no_grad()
def test_adaptive_batch_rows_equal_single_rows(criterion):
    """Rows that converge leave the batch; every row must get what it gets alone, and the
    test needs a threshold at which the rows really stop at different loops."""
    model = make_model("flt", std=0.3)
    idx = torch.randint(0, model.config.vocab_size, (4, 10),
                        generator=torch.Generator().manual_seed(5))
    mixed = None
    for threshold in [10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 1e-4]:
        score = decode_nll(model, idx, n_loops=6, adaptive=AdaptiveLoops(threshold, criterion))
        if len(set(score.loops[:, 1:].flatten().tolist())) > 1:
            mixed = threshold
            break
    assert mixed is not None, "no threshold gave rows different loop counts"
    batched = decode_nll(model, idx, n_loops=6, adaptive=AdaptiveLoops(mixed, criterion))
    for r in range(4):
        alone = decode_nll(model, idx[r:r + 1], n_loops=6, adaptive=AdaptiveLoops(mixed, criterion))
        torch.testing.assert_close(batched.nll[r], alone.nll[0], atol=1e-5, rtol=0)
        assert torch.equal(batched.loops[r], alone.loops[0])


@pytest.mark.parametrize("adaptive_prompt", [False, True])
@torch.no_grad()
def test_adaptive_ragged_batch_generates_what_each_prompt_generates_alone(adaptive_prompt):
    """Left padding gives every row its own positions and masks; the rows still looping
    must keep theirs when converged rows leave the batch (and, with adaptive prompts, when
    a prompt's tokens do)."""
    model = make_model("flt", std=0.3, window_pattern="SL", sequence_len=32)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [4], [20, 21, 22], [30, 31]]
    opts = dict(max_tokens=8, temperature=0, n_loops=6, adaptive_prompt=adaptive_prompt)
    for threshold in [1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3]:
        batch = generate(model, prompts, adaptive_threshold=threshold, **opts)
        if len({n for row in batch.loops for n in row[1:]}) > 1:
            break
    else:
        pytest.fail("no threshold gave rows different loop counts")
    for r, prompt in enumerate(prompts):
        alone = generate(model, prompt, adaptive_threshold=threshold, **opts)
        assert batch.tokens[r] == alone.tokens[0]
        assert batch.loops[r] == alone.loops[0]


def test_generate_reports_adaptive_loops():
    model = make_model("flt")
    out = generate(model, [1, 2, 3], max_tokens=6, n_loops=4, temperature=0,
                   adaptive_threshold=float("inf"))
    assert out.loops[0] == [4] + [2] * 5  # the first token comes from the full prefill
    assert out.mean_loops == pytest.approx((4 + 10) / 6)


# ---- shared cache slots -------------------------------------------------------------------
@given(n_loops=st.integers(1, 12), slots=st.integers(1, 12),
       policy=st.sampled_from(["block", "modulo"]))
def test_loop_slot_map_uses_every_slot_and_keeps_order(n_loops, slots, policy):
    mapping = loop_slot_map(n_loops, slots, policy)
    assert len(mapping) == n_loops
    assert set(mapping) == set(range(min(slots, n_loops)))
    if policy == "block":
        assert mapping == sorted(mapping)  # loops that share a slot are neighbours


@torch.no_grad()
def test_shared_slots_change_decoding_but_not_a_full_slot_count():
    model = make_model("flt")
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    exact = decode_nll(model, idx, n_loops=4)
    same = decode_nll(model, idx, n_loops=4, cache_slots=4)
    shared = decode_nll(model, idx, n_loops=4, cache_slots=2)
    torch.testing.assert_close(same.nll, exact.nll, atol=0, rtol=0)
    assert not torch.allclose(shared.nll, exact.nll, atol=1e-5)
    # the first prediction comes from the prefill alone, which is exact
    torch.testing.assert_close(shared.nll[:, 0], exact.nll[:, 0], atol=1e-6, rtol=0)


# ---- the CLI ------------------------------------------------------------------------------
def test_sample_command_streams_from_a_run(tmp_path, capsys):
    from loopedlm.cli import main
    from loopedlm.data.tokenizer_training import train_tokenizer
    from loopedlm.model.checkpoint import save_model

    texts = ["To be, or not to be, that is the question."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = make_model("flt", vocab_size=tokenizer.vocab_size, sequence_len=64)
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "step_000010", model)
    tokenizer.save(run / "tokenizer")
    args = [str(run), "--prompt", "To be", "--n-loops", "2", "--max-tokens", "5",
            "--seed", "1", "--temperature", "0"]
    assert main(["sample", *args]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("To be") and "tokens/s" in err
    expected = generate(model, "To be", tokenizer=tokenizer, n_loops=2, max_tokens=5,
                        temperature=0, stop=[tokenizer.bos_id])
    assert out == "To be" + expected.texts[0] + "\n"
    assert main(["sample", *args, "--top-p", "2"]) == 2
    out, err = capsys.readouterr()
    assert "top_p=2.0" in err and out == ""  # bad input: an error, and no half-printed prompt
