"""Adaptive prompts (`AdaptiveLoops(prompt=True)`, docs/design.md#decoding): a prompt's tokens
stop looping by the exit rule of decoded tokens, and the prefill leaves what feeding the
prompt one token at a time through the reference decoder leaves."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, tiny_model
from reference_decoding import ReferenceCache, decode_step
from reference_huginn import huginn_weights, tiny_huginn_config, write_huginn_folder
from reference_ouro import ouro_weights, tiny_ouro_config, write_ouro_folder

from loopedlm.infer import DecodeEngine, SamplingParams, SequenceParams
from loopedlm.infer.engine import AdaptiveLoops
from loopedlm.model.checkpoint import load_model

GREEDY = SamplingParams(temperature=0)
THRESHOLDS = [3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4, 1e-4]


def ids(vocab: int, length: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def fed_one_by_one(model, prompt: list[int], n_loops: int, adaptive: AdaptiveLoops
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (T, V), loops (T,)) of each prompt token fed alone, in order, to the reference
    decoder with adaptive loops (its skipped loops' keys copied from its last loop)."""
    cache, logits, loops = ReferenceCache(), [], []
    for token in prompt:
        row, spent = decode_step(model, torch.tensor([token]), cache, n_loops, adaptive)
        logits.append(row[0])
        loops.append(int(spent[0]))
    return torch.stack(logits), torch.tensor(loops)


def prefilled(model, prompt: list[int], n_loops: int, adaptive: AdaptiveLoops | None, **engine
              ) -> tuple[torch.Tensor, DecodeEngine]:
    eng = DecodeEngine(model, max_batch=2, max_loops=n_loops, compile=False, **engine)
    logits = eng.prefill(0, prompt, SequenceParams(n_loops=n_loops, adaptive=adaptive))
    return logits, eng


def _spread_thresholds(model, prompt, n_loops, criterion, check) -> None:
    """Run `check(adaptive)` at thresholds from loose to tight until one gives the prompt's
    tokens different loop counts (fail if none does)."""
    for threshold in THRESHOLDS:
        adaptive = AdaptiveLoops(threshold, criterion, prompt=True)
        _, loops = fed_one_by_one(model, prompt, n_loops, adaptive)
        check(adaptive)
        if len(set(loops.tolist())) > 1:
            return
    pytest.fail("no threshold gave the prompt's tokens different loop counts")


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "swa"])
@pytest.mark.parametrize("mode", ["lt", "lti", "ltai", "flt_res", "flt"])
@torch.no_grad()
def test_an_adaptive_prompt_equals_its_tokens_fed_one_by_one(mode, variant):
    """Every token of the prompt stops where the reference decoder, fed the prompt one token
    at a time, stops it, with the same logits at every position, in every loop mode and
    attention variant, at thresholds that spread the tokens over several loop counts."""
    model = tiny_model(3, std=0.3, loop_mode=mode, **VARIANTS[variant])
    prompt = ids(model.config.vocab_size, 14, seed=5)

    def check(adaptive):
        theirs, their_loops = fed_one_by_one(model, prompt, 6, adaptive)
        ours, engine = prefilled(model, prompt, 6, adaptive)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        info = engine.state.infos[0]
        assert info.prompt_loops == int(their_loops.sum())
        assert info.last_loops == int(their_loops[-1])

    _spread_thresholds(model, prompt, 6, "state", check)


@torch.no_grad()
def test_an_adaptive_prompt_with_shared_cache_slots_equals_the_exact_cache():
    """Within one pass shared cache slots are exact (a loop reads its own keys: the looping
    tokens' just written, the stopped ones' carried into its slot), so an adaptive prompt
    gives the exact cache's logits and loops. (Fed one token at a time, shared slots are
    not exact: a slot holds the last loop written to it.)"""
    model = tiny_model(4, std=0.3, loop_mode="flt")
    prompt = ids(model.config.vocab_size, 12, seed=6)
    for slots, policy in [(2, "block"), (3, "modulo")]:
        def check(adaptive, slots=slots, policy=policy):
            exact, engine = prefilled(model, prompt, 6, adaptive)
            shared, other = prefilled(model, prompt, 6, adaptive, cache_slots=slots,
                                      slot_policy=policy)
            torch.testing.assert_close(shared, exact, atol=1e-5, rtol=0)
            assert other.state.infos[0].prompt_loops == engine.state.infos[0].prompt_loops

        _spread_thresholds(model, prompt, 6, "state", check)


@pytest.mark.parametrize("mode", ["lt", "flt"])
@torch.no_grad()
def test_threshold_zero_gives_the_plain_prefill_bit_for_bit(mode):
    """Where no token stops early the adaptive prompt is the plain prefill: same passes,
    same bits, every loop run."""
    model = tiny_model(1, std=0.3, loop_mode=mode)
    prompts = [ids(model.config.vocab_size, n, seed=n) for n in (9, 4, 13)]
    plain = DecodeEngine(model, max_batch=4, max_loops=5, compile=False)
    adaptive = DecodeEngine(model, max_batch=4, max_loops=5, compile=False)
    plain.add_many([(i, p, SequenceParams(n_loops=5, sampling=GREEDY))
                    for i, p in enumerate(prompts)])
    adaptive.add_many([(i, p, SequenceParams(n_loops=5, sampling=GREEDY, adaptive=AdaptiveLoops(
        0.0, "state", prompt=True))) for i, p in enumerate(prompts)])
    for slot, prompt in enumerate(prompts):
        assert adaptive.state.infos[slot].prompt_loops == 5 * len(prompt)
    for engine in (plain, adaptive):
        engine.release(0)
    a = plain.prefill(0, prompts[0], SequenceParams(n_loops=5))
    b = adaptive.prefill(0, prompts[0], SequenceParams(n_loops=5, adaptive=AdaptiveLoops(
        0.0, "state", prompt=True)))
    assert torch.equal(a, b)
    assert torch.equal(plain.output(4).tokens[1:], adaptive.output(4).tokens[1:])


@torch.no_grad()
def test_prompts_prefilled_together_equal_each_alone_and_decoding_goes_on_exactly():
    """Rows of different lengths and thresholds prefilled in one pass (`add_many`) give what
    each gives alone: the same loops, logits and, decoding on, tokens; a row whose prompt runs
    every loop may share the call."""
    model = tiny_model(2, std=0.3, loop_mode="flt")
    prompts = [ids(model.config.vocab_size, n, seed=10 + n) for n in (11, 3, 7)]
    settings = [SequenceParams(n_loops=6, sampling=GREEDY, max_new_tokens=6,
                               adaptive=AdaptiveLoops(t, "state", prompt=True))
                for t in (0.03, 0.01, 0.1)] + [SequenceParams(n_loops=6, sampling=GREEDY,
                                                              max_new_tokens=6)]
    prompts.append(ids(model.config.vocab_size, 5, seed=99))

    def run(together: bool) -> tuple[list[list[int]], list[int]]:
        engine = DecodeEngine(model, max_batch=4, max_loops=6, compile=False)
        requests = [(i, p, s) for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]
        if together:
            assert engine.add_many(requests) == [None] * 4
        else:
            for request in requests:
                engine.add(*request)
        out = [engine.output().tokens.tolist()]
        out += [engine.step().tokens.tolist() for _ in range(5)]
        return out, [engine.state.infos[i].prompt_loops for i in range(4)]

    together, loops_together = run(True)
    alone, loops_alone = run(False)
    assert together == alone
    assert loops_together == loops_alone
    assert loops_together[3] == 6 * len(prompts[3])  # not adaptive: every loop
    assert loops_together[0] < 6 * len(prompts[0])


@pytest.mark.parametrize("layout", ["flat", "padded"])
@torch.no_grad()
def test_prompts_prefilled_together_equal_their_tokens_fed_one_by_one(layout, monkeypatch):
    """Several prompts in one pass, in either layout of the tokens still looping: all rows'
    tokens as one sequence (each attending over its own row's keys among all rows'), or each
    row's padded to the longest: every row's last logits and loops are the reference
    decoder's."""
    import loopedlm.infer.adaptive_prompt as adaptive_prompt

    monkeypatch.setattr(adaptive_prompt, "FLAT_MASK_LIMIT", 1 << 30 if layout == "flat" else 0)
    model = tiny_model(6, std=0.3, loop_mode="flt", window_pattern="SL", depth=3)
    prompts = [ids(model.config.vocab_size, n, seed=20 + n) for n in (12, 5, 9, 1)]

    def check(adaptive):
        engine = DecodeEngine(model, max_batch=4, max_loops=6, compile=False)
        params = SequenceParams(n_loops=6, sampling=GREEDY, adaptive=adaptive)
        results = engine.prefill_many([(i, p, params) for i, p in enumerate(prompts)])
        for slot, (prompt, logits) in enumerate(zip(prompts, results, strict=True)):
            theirs, loops = fed_one_by_one(model, prompt, 6, adaptive)
            torch.testing.assert_close(logits, theirs[-1], atol=1e-4, rtol=0)
            assert engine.prompt_loops(slot) == int(loops.sum())

    _spread_thresholds(model, prompts[0], 6, "state", check)


@torch.no_grad()
def test_a_prompt_prefilled_in_chunks_equals_one_chunk():
    model = tiny_model(5, std=0.3, loop_mode="flt")
    prompt = ids(model.config.vocab_size, 15, seed=2)
    adaptive = AdaptiveLoops(0.03, "state", prompt=True)
    whole, engine = prefilled(model, prompt, 6, adaptive)
    eng = DecodeEngine(model, max_batch=2, max_loops=6, compile=False)
    first = eng.prefill(0, prompt[:6], SequenceParams(n_loops=6, adaptive=adaptive))
    rest = eng.prefill(0, prompt[6:])
    torch.testing.assert_close(torch.cat([first, rest]), whole, atol=1e-4, rtol=0)
    assert eng.state.infos[0].prompt_loops == engine.state.infos[0].prompt_loops


@torch.no_grad()
def test_an_ouro_prompt_stops_by_its_gate_as_fed_one_by_one(tmp_path):
    """The gate criterion (Ouro's rule) on a prompt: each token's cumulative exit
    probability, as the reference decoder computes it."""
    config = tiny_ouro_config()
    model, _ = load_model(write_ouro_folder(tmp_path / "ouro", config,
                                            ouro_weights(config, seed=0, std=0.3), 1))
    prompt = ids(model.config.vocab_size, 10, seed=4)
    seen = set()
    for q in [0.2, 0.5, 0.8, 0.95]:
        adaptive = AdaptiveLoops(q, prompt=True)  # the model's own rule: the gate
        theirs, loops = fed_one_by_one(model, prompt, 4, adaptive)
        ours, engine = prefilled(model, prompt, 4, adaptive)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert engine.state.infos[0].prompt_loops == int(loops.sum())
        seen |= set(loops.tolist())
    assert len(seen) > 2, f"the thresholds tried gave loop counts {seen} only"


def test_adaptive_prompt_bad_settings_are_refused_with_the_value(tmp_path):
    with pytest.raises(ValueError, match=r"adaptive_prompt=True with adaptive_criterion='kl' is "
                                         r"not allowed: a prompt stops by \['state', 'gate'\]"):
        AdaptiveLoops(0.1, "kl", prompt=True)
    with pytest.raises(ValueError, match="adaptive_prompt='yes' is not allowed: True or False"):
        AdaptiveLoops(0.1, prompt="yes")
    config = tiny_huginn_config()
    huginn, _ = load_model(write_huginn_folder(tmp_path / "huginn", config,
                                               huginn_weights(config, seed=0, std=0.2)))
    engine = DecodeEngine(huginn, max_batch=1, compile=False)
    with pytest.raises(ValueError, match="adaptive_prompt=True is not allowed for this model: "
                                         "its layers outside the loop"):
        engine.add(0, [1, 2, 3], SequenceParams(adaptive=AdaptiveLoops(0.1, prompt=True)))
    assert engine.active_slots == []
