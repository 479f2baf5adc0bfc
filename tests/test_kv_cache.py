"""KV-cache decoding equals a full forward (docs/design.md#kv-cache): the decode engine over
every loop mode x attention variant x loop count, ragged prompts, and a prefill split at any
point; and the cache itself (one entry per (loop, layer), shared slots)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm import LoopedGPT
from loopedlm.infer import DecodeEngine, SequenceParams

MODES = ["lt", "lti", "ltai", "flt_res", "flt"]
# sliding window: sequence_len 16 -> window 4, far shorter than the test sequences
VARIANTS = {
    "mha": {},
    "gqa": dict(n_head=4, n_kv_head=2),
    "mla": dict(attn_type="mla", kv_rank=8),
    "swa": dict(window_pattern="SL", sequence_len=16),
    # every layer windowed, the last too (the reach task's models)
    "swa_all": dict(window_pattern="S", window_size=3, full_last_layer=False),
}
LOOPS = [1, 2, 5]
ATOL = 1e-5


def make_model(mode: str, variant: str, seed: int = 0) -> LoopedGPT:
    return tiny_model(seed, std=0.1, loop_mode=mode, **VARIANTS[variant])


def cached_logits(model: LoopedGPT, idx: torch.Tensor, n_loops: int, chunks: list[int],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed `idx` through a fresh decode engine in chunks of the given sizes and concatenate
    the logits: one slot per row holding only its real tokens (`attention_mask`: False marks
    left padding); the first chunk and multi-token chunks are prefills, one-token chunks are
    batched decode steps. Padded positions' logits are left at 0."""
    batch, length = idx.shape
    mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask
    engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops,
                          max_len=min(length + 1, model.config.sequence_len))
    params = SequenceParams(n_loops=n_loops)
    out = torch.zeros(batch, length, model.config.vocab_size)
    start = 0
    for size in chunks:
        if start > 0 and size == 1:
            out[:, start] = engine.decode(idx[:, start])[0]
        else:
            for r in range(batch):
                real = mask[r, start:start + size]
                if real.any():
                    logits = engine.prefill(r, idx[r, start:start + size][real], params)
                    out[r, start:start + size][real] = logits
        start += size
    return out


@pytest.mark.parametrize("n_loops", LOOPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_prefill_then_decode_matches_full_forward(mode, variant, n_loops):
    model = make_model(mode, variant)
    T = 13
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    full = model(idx, n_loops=n_loops)
    prefill = 5
    got = cached_logits(model, idx, n_loops, [prefill] + [1] * (T - prefill))
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n_loops", LOOPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_ragged_left_padded_batch_matches_single_rows(mode, variant, n_loops):
    model = make_model(mode, variant, seed=2)
    gen = torch.Generator().manual_seed(3)
    lengths, n_decode = [9, 4, 1], 4
    width = max(lengths)
    rows = [torch.randint(0, model.config.vocab_size, (n + n_decode,), generator=gen)
            for n in lengths]
    idx = torch.zeros(len(rows), width + n_decode, dtype=torch.long)
    mask = torch.zeros_like(idx, dtype=torch.bool)
    for r, (n, row) in enumerate(zip(lengths, rows, strict=True)):
        idx[r, width - n:] = row
        mask[r, width - n:] = True
    got = cached_logits(model, idx, n_loops, [width] + [1] * n_decode, attention_mask=mask)
    # the padded batch without a cache, in one pass, must agree as well
    uncached = model(idx, n_loops=n_loops, attention_mask=mask)
    for r, (n, row) in enumerate(zip(lengths, rows, strict=True)):
        single = model(row[None], n_loops=n_loops)[0]
        torch.testing.assert_close(got[r, width - n:], single, atol=ATOL, rtol=0)
        torch.testing.assert_close(uncached[r, width - n:], single, atol=ATOL, rtol=0)
        assert torch.isfinite(uncached[r]).all()  # padding queries must not produce NaN


@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(MODES), variant=st.sampled_from(list(VARIANTS)),
       n_loops=st.integers(1, 4), length=st.integers(2, 16), data=st.data())
@torch.no_grad()
def test_any_prefill_split_matches_full_forward(mode, variant, n_loops, length, data):
    """Any chunking of the sequence (a prompt split anywhere, multi-token chunks after
    cached tokens) gives the full forward's logits."""
    model = make_model(mode, variant, seed=4)
    cuts = data.draw(st.lists(st.integers(1, length - 1), unique=True, max_size=3))
    bounds = [0, *sorted(cuts), length]
    chunks = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    seed = data.draw(st.integers(0, 2**16))
    idx = torch.randint(0, model.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(cached_logits(model, idx, n_loops, chunks),
                               model(idx, n_loops=n_loops), atol=ATOL, rtol=0)


@torch.no_grad()
def test_earlier_loops_see_every_cached_token():
    """The defect of the authors' code (one cache for the last loop only) breaks this: with
    one entry per (loop, layer), every loop of a prefill writes its own keys for every
    token, and they differ between loops."""
    model = make_model("lt", "mha")
    engine = DecodeEngine(model, max_batch=1, max_loops=3)
    engine.prefill(0, torch.randint(0, model.config.vocab_size, (9,)), SequenceParams(n_loops=3))
    for layer in range(model.config.depth):
        keys = [engine.cache.entry(loop, layer)[0][0, :, :9] for loop in range(3)]
        assert all(k.abs().sum(-1).gt(0).all() for k in keys)  # every token, every loop
        assert not torch.allclose(keys[0], keys[1]) and not torch.allclose(keys[1], keys[2])


@torch.no_grad()
def test_shared_slots_are_exact_within_one_pass_and_use_less_memory():
    model = make_model("lt", "mha")
    idx = torch.randint(0, model.config.vocab_size, (12,))
    exact = DecodeEngine(model, max_batch=1, max_loops=4)
    shared = DecodeEngine(model, max_batch=1, max_loops=4, cache_slots=2)
    assert shared.cache.nbytes() * 2 == exact.cache.nbytes()
    # a prompt processed in one pass never reads another loop's keys
    torch.testing.assert_close(shared.prefill(0, idx, SequenceParams(n_loops=4)),
                               model(idx[None], n_loops=4)[0], atol=ATOL, rtol=0)


def test_the_cache_rejects_what_does_not_fit():
    model = make_model("flt", "mha")
    engine = DecodeEngine(model, max_batch=2, max_loops=3, max_len=6)
    engine.prefill(0, [1, 2, 3, 4], SequenceParams(n_loops=2))
    with pytest.raises(ValueError, match="slot 0 runs n_loops=2, not 3"):
        engine.prefill(0, [5], SequenceParams(n_loops=3))
    with pytest.raises(ValueError, match="n_loops=4"):
        engine.prefill(1, [1], SequenceParams(n_loops=4))
    with pytest.raises(ValueError, match=r"prompt of 7 tokens \(4 cached\).*max_len=6"):
        engine.prefill(0, [5, 6, 7])
    with pytest.raises(ValueError, match="cache_slots=0"):
        DecodeEngine(model, max_batch=1, max_loops=3, cache_slots=0)


@pytest.mark.parametrize("slots,share_first", [(None, True), (3, False), (2, True)])
@pytest.mark.parametrize("lasts", [(1, 1), (1, 3), (0, 5)])
def test_filling_skipped_loops_copies_the_last_loops_entry_to_every_later_loop(slots,
                                                                               share_first,
                                                                               lasts):
    """`fill_skipped_loops` (once per step, one write per layer, from device tensors) gives
    every loop after a row's last computed one, through its own cache slot, that loop's keys
    and values at the row's position, and touches nothing else (rows with nothing to fill,
    rows beyond the batch): the same as copying loop after loop, entry after entry, row after
    row (rows that stopped at the same loop, or at others)."""
    from loopedlm.infer.cache import StaticKVCache, loop_slot_map

    config = make_model("flt", "mha").config
    n_loops, gen = 6, torch.Generator().manual_seed(0)
    cache = StaticKVCache(config, 4, 8, loop_slot_map(n_loops, slots), dtype=torch.float32,
                          device="cpu", share_first_layer=share_first)
    for k, v in cache.stores:
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    expected = [[t.clone() for t in kv] for kv in cache.stores]
    rows, pos = torch.tensor([0, 2]), torch.tensor([5, 1])
    for k_store, v_store in expected:  # the copy, row after row, loop after loop
        if k_store.size(0) == 1:
            continue
        for row, at, last in zip(rows.tolist(), pos.tolist(), lasts, strict=True):
            source = cache.slot_of_loop[last]
            for loop in range(last + 1, n_loops):
                slot = cache.slot_of_loop[loop]
                if slot != source:
                    for store in (k_store, v_store):
                        store[slot, row, :, at] = store[source, row, :, at]
    # rows [0, 3): row 1 has nothing to fill (-1, at the last position), row 3 is not given
    cache.fill_skipped_loops(torch.tensor([lasts[0], -1, lasts[1]]), torch.tensor([5, 7, 1]))
    for got, want in zip(cache.stores, expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the entries are views of the stores: what a pass reads is what was filled
    k_last, _ = cache.entry(n_loops - 1, 1)
    for i, last in enumerate(lasts):
        assert torch.equal(k_last[rows[i], :, pos[i]], cache.entry(last, 1)[0][rows[i], :, pos[i]])
