"""KV-cache decoding equals a full forward (SPEC 2): every loop mode x attention variant
x loop count, ragged left-padded batches, and a prefill split at any point."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm import KVCache, LoopedGPT, ModelConfig
from loopedlm.infer import DecodeEngine

MODES = ["lt", "lti", "ltai", "flt_res", "flt"]
# sliding window: sequence_len 16 -> window 4, far shorter than the test sequences
VARIANTS = {
    "mha": {},
    "gqa": dict(n_head=4, n_kv_head=2),
    "mla": dict(attn_type="mla", kv_rank=8),
    "swa": dict(window_pattern="SL", sequence_len=16),
}
LOOPS = [1, 2, 5]
ATOL = 1e-5


def make_model(mode: str = "flt", variant: str = "mha", seed: int = 0, std: float = 0.1,
               **overrides) -> LoopedGPT:
    """A tiny model with random non-zero weights everywhere (init_weights zeroes the output
    projections, which would make the loop modes look alike)."""
    cfg = dict(depth=2, d_model=32, n_head=2, vocab_size=53, sequence_len=24, n_loops=3,
               loop_mode=mode)
    cfg.update(VARIANTS[variant], **overrides)
    model = LoopedGPT.from_config(ModelConfig(**cfg), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


# the two decoders: the model's own forward with a KVCache, and the decode engine
BACKENDS = ["kv_cache", "engine"]


def cached_logits(model: LoopedGPT, idx: torch.Tensor, n_loops: int, chunks: list[int],
                  attention_mask: torch.Tensor | None = None,
                  backend: str = "kv_cache") -> torch.Tensor:
    """Feed `idx` through a fresh cache in chunks of the given sizes; concatenate logits."""
    if backend == "engine":
        return engine_logits(model, idx, n_loops, chunks, attention_mask)
    cache = KVCache.for_model(model.config, idx.size(0), n_loops=n_loops)
    out, start = [], 0
    for size in chunks:
        mask = None if attention_mask is None else attention_mask[:, start:start + size]
        out.append(model(idx[:, start:start + size], n_loops=n_loops, kv_cache=cache,
                         attention_mask=mask))
        start += size
    assert start == idx.size(1) and cache.pos == start
    return torch.cat(out, dim=1)


def engine_logits(model: LoopedGPT, idx: torch.Tensor, n_loops: int, chunks: list[int],
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`cached_logits` through the decode engine: one slot per row holding only its real
    tokens (no padding); the first chunk and multi-token chunks are prefills, one-token
    chunks are batched decode steps. Padded positions' logits are left at 0."""
    batch, length = idx.shape
    mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask
    engine = DecodeEngine(model, max_batch=batch, max_loops=n_loops,
                          max_len=min(length + 1, model.config.sequence_len))
    out = torch.zeros(batch, length, model.config.vocab_size)
    start = 0
    for size in chunks:
        if start > 0 and size == 1:
            out[:, start] = engine.decode(idx[:, start])[0]
        else:
            for r in range(batch):
                real = mask[r, start:start + size]
                if real.any():
                    logits = engine.prefill(r, idx[r, start:start + size][real], n_loops=n_loops)
                    out[r, start:start + size][real] = logits
        start += size
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_loops", LOOPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_prefill_then_decode_matches_full_forward(mode, variant, n_loops, backend):
    model = make_model(mode, variant)
    T = 13
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    full = model(idx, n_loops=n_loops)
    prefill = 5
    got = cached_logits(model, idx, n_loops, [prefill] + [1] * (T - prefill), backend=backend)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_loops", LOOPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_ragged_left_padded_batch_matches_single_rows(mode, variant, n_loops, backend):
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
    got = cached_logits(model, idx, n_loops, [width] + [1] * n_decode, attention_mask=mask,
                        backend=backend)
    # the padded batch without a cache, in one pass, must agree as well
    uncached = model(idx, n_loops=n_loops, attention_mask=mask)
    for r, (n, row) in enumerate(zip(lengths, rows, strict=True)):
        single = model(row[None], n_loops=n_loops)[0]
        torch.testing.assert_close(got[r, width - n:], single, atol=ATOL, rtol=0)
        torch.testing.assert_close(uncached[r, width - n:], single, atol=ATOL, rtol=0)
        assert torch.isfinite(got[r]).all()  # padding queries must not produce NaN


@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(MODES), variant=st.sampled_from(list(VARIANTS)),
       n_loops=st.integers(1, 4), length=st.integers(2, 16), data=st.data(),
       backend=st.sampled_from(BACKENDS))
@torch.no_grad()
def test_any_prefill_split_matches_full_forward(mode, variant, n_loops, length, data, backend):
    """Any chunking of the sequence (a prompt split anywhere, multi-token chunks after
    cached tokens) gives the full forward's logits."""
    model = make_model(mode, variant, seed=4)
    cuts = data.draw(st.lists(st.integers(1, length - 1), unique=True, max_size=3))
    bounds = [0, *sorted(cuts), length]
    chunks = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    seed = data.draw(st.integers(0, 2**16))
    idx = torch.randint(0, model.config.vocab_size, (1, length),
                        generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(cached_logits(model, idx, n_loops, chunks, backend=backend),
                               model(idx, n_loops=n_loops), atol=ATOL, rtol=0)


@torch.no_grad()
def test_earlier_loops_see_every_cached_token():
    """The defect of the authors' code (one cache for the last loop only) breaks this: with
    one entry per (loop, layer), loop 1 of a decoded token reads all earlier keys."""
    model = make_model("flt", "mha")
    idx = torch.randint(0, model.config.vocab_size, (1, 10))
    cache = KVCache.for_model(model.config, 1, n_loops=3)
    model(idx[:, :9], n_loops=3, kv_cache=cache)
    k = cache.k[:, :, 0, :, :9]
    # every loop wrote its own keys, and they differ between loops
    assert all(k[t].abs().sum() > 0 for t in range(3))
    assert not torch.allclose(k[0], k[1]) and not torch.allclose(k[1], k[2])


@torch.no_grad()
def test_shared_slots_are_exact_within_one_pass_and_use_less_memory():
    model = make_model("flt", "mha")
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    exact = KVCache.for_model(model.config, 1, n_loops=4)
    shared = KVCache.for_model(model.config, 1, n_loops=4, loop_slots=[0, 0, 1, 1])
    assert shared.nbytes() * 2 == exact.nbytes()
    # a prompt processed in one pass never reads another loop's keys
    torch.testing.assert_close(model(idx, n_loops=4, kv_cache=shared), model(idx, n_loops=4),
                               atol=ATOL, rtol=0)


def test_cache_rejects_mismatched_use():
    model = make_model("flt", "mha")
    idx = torch.randint(0, model.config.vocab_size, (2, 4))
    cache = KVCache.for_model(model.config, 2, n_loops=3, max_len=6)
    with pytest.raises(ValueError, match="n_loops=2"):
        model(idx, n_loops=2, kv_cache=cache)
    with pytest.raises(ValueError, match="batch 2"):
        model(idx[:1], n_loops=3, kv_cache=cache)
    model(idx, n_loops=3, kv_cache=cache)
    with pytest.raises(ValueError, match="holds 6 tokens"):
        model(idx, n_loops=3, kv_cache=cache)
    with pytest.raises(ValueError, match="loop_slots"):
        KVCache.for_model(model.config, 1, n_loops=3, loop_slots=[0, 1])
