"""Long prompts (issue 17): RoPE tables cover 10 x sequence_len, as the authors' model, so
evaluation feeds a prompt longer than the training context whole; training still stops at
sequence_len; logits of every input that fits in sequence_len are unchanged, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from eval_helpers import ByteTokenizer, tiny_random_model

from loopedlm.evaluate import budget
from loopedlm.evaluate.core import evaluate_task
from loopedlm.evaluate.items import TaskSpec
from loopedlm.infer import DecodeEngine
from loopedlm.model.attention import rotary_tables
from loopedlm.model.config import ROTARY_LENGTH_FACTOR

VARIANTS = {
    "mha": {},
    "gqa": dict(n_head=4, n_kv_head=2),
    "mla": dict(attn_type="mla", kv_rank=8),
    "swa": dict(window_pattern="SL", depth=3, sequence_len=16),
    "mla_swa": dict(attn_type="mla", kv_rank=8, window_pattern="S", sequence_len=16),
}


@pytest.mark.parametrize("seq_len", [1, 7, 16, 24, 100, 1024, 2048])
@pytest.mark.parametrize("head_dim", [2, 16, 64, 128])
def test_a_longer_table_starts_with_the_old_one_bit_for_bit(seq_len, head_dim):
    cos, sin = rotary_tables(seq_len, head_dim, 10000.0)
    long_cos, long_sin = rotary_tables(ROTARY_LENGTH_FACTOR * seq_len, head_dim, 10000.0)
    assert long_cos.dtype == cos.dtype == torch.bfloat16
    assert torch.equal(long_cos[:seq_len], cos) and torch.equal(long_sin[:seq_len], sin)


def with_old_table(model):
    """The same weights with the RoPE table as long as before issue 17 (sequence_len rows)."""
    old = copy.deepcopy(model)
    cfg = old.config
    old.cos, old.sin = rotary_tables(cfg.sequence_len, cfg.head_dim, cfg.rope_base)
    return old


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["lt", "flt"])
def test_logits_within_sequence_len_are_unchanged(mode, variant):
    model = tiny_model(loop_mode=mode, n_loops=3, **VARIANTS[variant])
    cfg = model.config
    assert model.cos.size(0) == ROTARY_LENGTH_FACTOR * cfg.sequence_len == cfg.rotary_len
    old = with_old_table(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for length in (1, cfg.sequence_len // 2, cfg.sequence_len):
            idx = torch.randint(0, cfg.vocab_size, (2, length), generator=gen)
            assert torch.equal(model(idx), old(idx))
            assert torch.equal(model(idx, idx), old(idx, idx))
            padded = torch.ones_like(idx, dtype=torch.bool)
            padded[0, : length // 2] = False
            assert torch.equal(model(idx, attention_mask=padded), old(idx, attention_mask=padded))
        # cached decoding reads the table by position too
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.sequence_len), generator=gen)
        steps = []
        for m in (model, old):
            engine = DecodeEngine(m, max_batch=2)
            half = cfg.sequence_len // 2
            out = [torch.stack([engine.prefill(r, idx[r, :half]) for r in range(2)])]
            out += [engine.decode(idx[:, t])[0][:, None] for t in range(half, cfg.sequence_len)]
            steps.append(torch.cat(out, 1))
        assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("variant", ["mha", "swa"])
def test_a_long_prompt_runs_whole_and_stays_causal(variant):
    model = tiny_model(loop_mode="flt", **VARIANTS[variant])
    cfg = model.config
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.sequence_len), generator=gen)
    with torch.no_grad():
        long = model(idx)
        short = model(idx[:, : cfg.sequence_len])
    assert long.shape[1] == 3 * cfg.sequence_len and torch.isfinite(long).all()
    # the first sequence_len positions see only their past: the same as the short input
    torch.testing.assert_close(long[:, : cfg.sequence_len], short, rtol=1e-5, atol=1e-5)


def test_training_still_stops_at_sequence_len_and_inference_at_the_table():
    model = tiny_model()
    cfg = model.config
    too_long_to_train = torch.zeros(1, cfg.sequence_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"longer than sequence_len={cfg.sequence_len}"):
        model(too_long_to_train, too_long_to_train)
    with torch.no_grad():
        model(torch.zeros(1, cfg.rotary_len, dtype=torch.long))
    with pytest.raises(ValueError, match=f"longer than the RoPE table \\({cfg.rotary_len} "):
        model(torch.zeros(1, cfg.rotary_len + 1, dtype=torch.long))


def lm_item(context_tokens: int) -> dict:
    return {"context": "ab" * (context_tokens // 2), "continuation": "xyz"}


def test_evaluation_does_not_crop_a_prompt_that_fits_in_the_table():
    model = tiny_random_model(sequence_len=16)  # table: 160 positions
    spec = TaskSpec("lm", "language_modeling")
    items = [lm_item(100), lm_item(150), lm_item(10)]
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    r = evaluate_task(model, ByteTokenizer(), spec, items)
    # BOS + context + " xyz"; the last token is only a target
    assert r["truncated"] == 0 and r["max_len"] == 161
    assert max(seen) == 1 + 150 + 4 - 1
    # beyond the table: cropped on the left, and counted
    r = evaluate_task(model, ByteTokenizer(), spec, [*items, lm_item(300)], return_details=True)
    assert r["truncated"] == 1
    assert [d["truncated"] for d in r["details"]] == [False, False, False, True]


def test_budget_results_say_how_many_prompts_were_cropped(tmp_path, monkeypatch):
    spec = TaskSpec("long", "language_modeling")
    monkeypatch.setattr(budget, "load_task", lambda name: (spec, [lm_item(20), lm_item(400)]))
    model = tiny_random_model(sequence_len=16)
    results = budget.evaluate_budget(model, ByteTokenizer(), [1, 2], tasks=["long"])
    assert results["cropped"] == {"long": {"examples": 1, "n": 2, "max_len": 161}}
    md = budget.write_budget_outputs(results, tmp_path)["md"].read_text()
    assert "cropped on the left (longer than the RoPE table): long 1/2 examples (> 161 tokens)" in md
    monkeypatch.setattr(budget, "load_task", lambda name: (spec, [lm_item(20)]))
    results = budget.evaluate_budget(model, ByteTokenizer(), [1], tasks=["long"])
    assert results["cropped"] == {}
    assert "longer than the RoPE table): none" in budget.markdown_table(results)
