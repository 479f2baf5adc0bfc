"""Self-speculative decoding (issue 25): the same weights at draft_loops loops draft tokens,
one pass at n_loops verifies them, and the output is the n_loops output: token for token
when greedy, in distribution when sampling (the acceptance rule, tested exactly on a tiny
vocabulary), with seeded rows batch-invariant and speculative rows sharing steps with plain
ones."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from scipy.stats import chi2

from loopedlm.infer import DecodeEngine, SamplingParams, SequenceParams
from loopedlm.infer.generate import generate
from loopedlm.infer.sampling import DRAFT, gumbel_argmax, speculative_accept

GREEDY = SamplingParams(temperature=0)


def run(model, requests: dict[int, tuple[list[int], SequenceParams]], steps: int,
        max_batch: int = 4, **engine_options) -> tuple[dict[int, list[int]], DecodeEngine]:
    """Add each (prompt, params) in its slot, step `steps` times; the tokens per slot."""
    engine = DecodeEngine(model, max_batch=max_batch, max_loops=6, compile=False,
                          **engine_options)
    tokens = {slot: [int(engine.add(slot, ids, params))]
              for slot, (ids, params) in requests.items()}
    for _ in range(steps):
        out = engine.step().tokens.tolist()
        for slot in requests:
            if out[slot] >= 0:
                tokens[slot].append(out[slot])
    return tokens, engine


# ---- greedy: token for token ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["flt", "lt", "ltai"])
@pytest.mark.parametrize("draft_loops", [1, 3, 5])
@torch.no_grad()
def test_greedy_speculative_decoding_is_the_n_loop_output(mode, draft_loops):
    """Weights of std 0.3 make the loops disagree, so drafts are rejected often and the
    stale cache entries of rejected positions are exercised."""
    model = tiny_model(std=0.3, loop_mode=mode, sequence_len=64, n_loops=6)
    prompt = [1, 2, 3, 4, 5]
    plain, _ = run(model, {0: (prompt, SequenceParams(n_loops=6, sampling=GREEDY))}, 30)
    spec, engine = run(model, {0: (prompt, SequenceParams(n_loops=6, sampling=GREEDY,
                                                          draft_loops=draft_loops))}, 30)
    assert spec == plain
    stats = engine.speculation
    assert stats.rounds > 0 and 1 <= stats.tokens_per_round <= 5
    assert stats.emitted >= 30  # (the last round may verify more than was asked for)


@torch.no_grad()
def test_speculative_rows_share_steps_with_plain_rows_exactly():
    """A speculative row among plain rows (other loop counts, other draft settings, a
    seeded sampler) gives what it gives alone, and so does every other row."""
    model = tiny_model(std=0.3, loop_mode="flt", sequence_len=64, n_loops=6)
    seeded = SamplingParams(temperature=1.0, seed=5)
    requests = {0: ([7, 8, 9], SequenceParams(n_loops=4, sampling=GREEDY)),
                1: ([1, 2, 3, 4, 5], SequenceParams(n_loops=6, sampling=GREEDY, draft_loops=2)),
                2: ([4, 4], SequenceParams(n_loops=6, sampling=seeded)),
                3: ([3, 1, 4], SequenceParams(n_loops=5, sampling=seeded, draft_loops=1,
                                              draft_tokens=3))}
    batched, _ = run(model, requests, 25)
    for slot, request in requests.items():
        alone, _ = run(model, {0: request}, 25, max_batch=1)
        assert alone[0] == batched[slot], slot
    # a seeded speculative row is the same in any slot, next to anything
    moved, _ = run(model, {2: requests[3], 0: requests[2]}, 25)
    assert moved[2] == batched[3]


@torch.no_grad()
def test_stop_ids_and_budgets_end_a_speculative_row_where_a_plain_one_ends():
    model = tiny_model(std=0.3, loop_mode="flt", sequence_len=32, n_loops=6)
    free, _ = run(model, {0: ([1, 2], SequenceParams(n_loops=6, sampling=GREEDY))}, 12)
    for options in (dict(stop_ids=(free[0][5],)), dict(max_new_tokens=4)):
        outs = []
        for draft in (None, 2):
            params = SequenceParams(n_loops=6, sampling=GREEDY, draft_loops=draft, **options)
            engine = DecodeEngine(model, max_batch=1, max_loops=6, compile=False)
            tokens = [int(engine.add(0, [1, 2], params))]
            for _ in range(10):
                out = engine.step()
                tokens.append((int(out.tokens[0]), bool(out.finished[0])))
            outs.append(tokens)
        assert outs[0] == outs[1]
    # near the end of the cache the drafts shrink to fit: the rows still end as plain ones
    long = list(range(1, 27))  # 32 - 26 = 6 positions left
    ends = [run(model, {0: (long, SequenceParams(n_loops=6, sampling=GREEDY, draft_loops=d))},
                8)[0][0] for d in (None, 3)]
    assert ends[0] == ends[1]


def test_generate_with_draft_loops_returns_the_plain_text_and_the_acceptance():
    model = tiny_model(std=0.3, loop_mode="flt", sequence_len=64, n_loops=6)
    plain = generate(model, [[1, 2, 3], [4, 5]], max_tokens=20, temperature=0)
    spec = generate(model, [[1, 2, 3], [4, 5]], max_tokens=20, temperature=0, draft_loops=2)
    assert spec.tokens == plain.tokens and spec.loops == plain.loops
    assert spec.speculation is not None and plain.speculation is None
    assert 0 <= spec.speculation.acceptance <= 1


# ---- sampling: the acceptance rule is exact ------------------------------------------------
def _chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((observed - expected) ** 2 / expected).sum())


def test_speculative_sampling_emits_the_target_distribution():
    """Two drafts from q, target distributions p0, p1, p2 on a 4-token vocabulary, 40,000
    seeded rows. The first token out must follow p0 and, completing rows that emitted one
    token with a fresh draw from p1 (what the next round would emit), the second token p1.
    Without the acceptance test the first token would follow q: the check can fail."""
    torch.manual_seed(0)
    n_rows, vocab = 40_000, 4
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.4, 0.4]])
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    seed = torch.arange(n_rows)
    counter = torch.zeros(n_rows, dtype=torch.long)
    drafts = torch.stack([gumbel_argmax(q[i].log().expand(n_rows, vocab), seed, counter + i,
                                        DRAFT) for i in range(2)], 1)
    tokens, emitted = speculative_accept(q.expand(n_rows, 2, vocab), drafts,
                                         p.expand(n_rows, 3, vocab), seed, counter)
    assert emitted.min() >= 1 and emitted.max() <= 3
    critical = chi2.ppf(0.999, vocab - 1)
    assert _chi_square(tokens[:, 0], p[0]) < critical
    assert _chi_square(drafts[:, 0], q[0]) < critical  # the drafts do follow q ...
    assert _chi_square(drafts[:, 0], p[0]) > 10 * critical  # ... which is far from p0
    fresh = gumbel_argmax(p[1].log().expand(n_rows, vocab), seed + n_rows, counter)
    second = torch.where(emitted >= 2, tokens[:, 1], fresh)
    assert _chi_square(second, p[1]) < critical
    # the rule is a function of (seed, counter): rows are the same in any batch
    again, count = speculative_accept(q.expand(7, 2, vocab), drafts[100:107],
                                      p.expand(7, 3, vocab), seed[100:107], counter[:7])
    assert torch.equal(again, tokens[100:107]) and torch.equal(count, emitted[100:107])


def test_greedy_acceptance_keeps_the_drafts_up_to_the_first_difference():
    one_hot = torch.eye(5)
    drafts = torch.tensor([[1, 2, 3], [1, 4, 3], [0, 0, 0]])
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    tokens, emitted = speculative_accept(one_hot[drafts], drafts, one_hot[target],
                                         torch.zeros(3, dtype=torch.long),
                                         torch.zeros(3, dtype=torch.long))
    assert emitted.tolist() == [4, 2, 1]
    assert [tokens[r, :n].tolist() for r, n in enumerate(emitted.tolist())] == \
        [[1, 2, 3, 4], [1, 2], [1]]


# ---- bad input -------------------------------------------------------------------------------
def test_bad_draft_settings_name_the_values():
    model = tiny_model(loop_mode="flt", sequence_len=16, n_loops=4)
    engine = DecodeEngine(model, max_batch=1, max_loops=6, compile=False)
    with pytest.raises(ValueError, match="draft_loops=4 is not allowed with n_loops=4"):
        engine.add(0, [1], SequenceParams(draft_loops=4))
    with pytest.raises(ValueError, match="draft_loops=6 is not allowed with n_loops=5"):
        engine.add(0, [1], SequenceParams(n_loops=5, draft_loops=6))
    with pytest.raises(ValueError, match="draft_loops=0 is not allowed"):
        SequenceParams(draft_loops=0)
    with pytest.raises(ValueError, match="draft_tokens=0 is not allowed"):
        SequenceParams(draft_loops=1, draft_tokens=0)
    with pytest.raises(ValueError, match="draft_loops and adaptive loops do not combine"):
        generate(model, [1, 2], draft_loops=1, adaptive_threshold=0.1)
    shared = DecodeEngine(model, max_batch=1, max_loops=4, cache_slots=2, compile=False)
    with pytest.raises(ValueError, match="draft_loops needs the exact cache"):
        shared.add(0, [1], SequenceParams(draft_loops=1))
    assert engine.active_slots == [] and shared.active_slots == []
