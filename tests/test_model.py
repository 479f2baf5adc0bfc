"""Invariants of LoopedGPT (docs/design.md#invariants): the backbone, the loop modes, the attention
variants and residual scaling."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VARIANTS, randomize_, tiny_config, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_model import Reference

from loopedlm import LOOP_MODES, LoopedGPT, ModelConfig

MODES = list(LOOP_MODES)


def idx_for(cfg, batch=2, seq=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq or cfg.sequence_len), generator=gen)


# ---- the paper's sizes -------------------------------------------------------------
@pytest.mark.parametrize("preset,expected", [("small", 127_107_072), ("base", 317_915_136)])
def test_paper_parameter_counts(preset, expected):
    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        model = LoopedGPT(cfg)
    assert model.num_params() == expected
    # eq. 6 of the paper (MHA): 2 * V_pad * d + L * 12 * d^2
    assert expected == 2 * cfg.padded_vocab_size * cfg.d_model + cfg.depth * 12 * cfg.d_model**2
    assert cfg.padded_vocab_size == 151_680 and cfg.head_dim == 128


def test_width_rule():
    cfg = ModelConfig(depth=12)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head) == (768, 6, 6)


# ---- parameter-free modes ----------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_modes_are_parameter_free(variant):
    shapes = {}
    for mode in MODES:
        model = LoopedGPT(tiny_config(loop_mode=mode, **VARIANTS[variant]))
        shapes[mode] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    first = shapes[MODES[0]]
    assert all(s == first for s in shapes.values())


def test_nanochat_state_dict_names():
    keys = set(LoopedGPT(tiny_config()).state_dict())
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.c_q.weight",
            "transformer.h.0.attn.c_k.weight", "transformer.h.0.attn.c_v.weight",
            "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_proj.weight"} <= keys
    mla = set(LoopedGPT(tiny_config(attn_type="mla", kv_rank=8)).state_dict())
    assert {"transformer.h.1.attn.c_kv_down.weight", "transformer.h.1.attn.c_k_up.weight",
            "transformer.h.1.attn.c_v_up.weight"} <= mla


# ---- exactness against the reference -----------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_one_loop_equals_plain_gpt_bit_for_bit(mode, variant):
    model = tiny_model(loop_mode=mode, n_loops=1, **VARIANTS[variant])
    idx = idx_for(model.config)
    ref = Reference(model.config, model.state_dict())
    plain = ref.logits_of(rms_plain(ref, idx))
    with torch.no_grad():
        assert torch.equal(model(idx), plain)
        assert torch.equal(model(idx, n_loops=1), plain)


def rms_plain(ref, idx):
    x0 = ref.w["transformer.wte.weight"][idx]
    return F.rms_norm(ref.plain_pass(F.rms_norm(x0, (x0.size(-1),))), (x0.size(-1),))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_reference(mode, variant):
    model = tiny_model(loop_mode=mode, n_loops=4, **VARIANTS[variant])
    idx = idx_for(model.config)
    ref = Reference(model.config, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref.logits(idx), rtol=0, atol=1e-6)


def test_modes_differ_with_random_weights():
    """Guards the equivalence tests: with non-zero weights the five modes really differ."""
    outs = {}
    for mode in MODES:
        model = tiny_model(loop_mode=mode, n_loops=3)
        outs[mode] = model(idx_for(model.config)).detach()
    for a in MODES:
        for b in MODES:
            if a < b:
                assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)


@pytest.mark.parametrize("loss_loops", ["last", "all", "last_third"])
@pytest.mark.parametrize("mode", ["lt", "flt"])
def test_loss_loops_match_reference(mode, loss_loops):
    model = tiny_model(loop_mode=mode, n_loops=5, loss_loops=loss_loops)
    idx = idx_for(model.config)
    targets = idx_for(model.config, seed=2)
    targets[0, :5] = -1
    ref = Reference(model.config, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets), ref.loss(idx, targets), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", ["inv_sqrt_loops", "inv_loops", "lambda_loops_sqrt_depth"])
def test_residual_scaling_matches_reference(scale):
    model = tiny_model(loop_mode="flt", n_loops=3, residual_scale=scale, residual_lambda=2.0)
    expected = {"inv_sqrt_loops": 3**-0.5, "inv_loops": 1 / 3,
                "lambda_loops_sqrt_depth": 2.0 / (3 * math.sqrt(2))}[scale]
    assert model.config.residual_eps() == pytest.approx(expected)
    idx = idx_for(model.config)
    ref = Reference(model.config, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref.logits(idx), rtol=0, atol=1e-6)


# ---- loss, overrides ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_loss_is_cross_entropy_of_logits(mode):
    model = tiny_model(loop_mode=mode)
    idx, targets = idx_for(model.config), idx_for(model.config, seed=3)
    targets[1, ::3] = -1
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert logits.shape == (2, model.config.sequence_len, model.config.vocab_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_loops_override_equals_model_built_with_that_count(mode, n):
    model = tiny_model(loop_mode=mode, n_loops=3)
    other = LoopedGPT(tiny_config(loop_mode=mode, n_loops=n))
    other.load_state_dict(model.state_dict())
    idx = idx_for(model.config)
    with torch.no_grad():
        assert torch.equal(model(idx, n_loops=n), other(idx))


def test_residual_norms_per_loop():
    model = tiny_model(loop_mode="lt", n_loops=4)
    idx = idx_for(model.config)
    _, norms = model(idx, return_residual_norms=True)
    assert norms.shape == (4,)
    # loop 1's norm recomputed by hand: the residual stream after the blocks, before norm
    ref = Reference(model.config, model.state_dict())
    x0 = ref.w["transformer.wte.weight"][idx]
    x = ref.plain_pass(F.rms_norm(x0, (x0.size(-1),)))
    torch.testing.assert_close(norms[0], x.pow(2).mean().sqrt(), rtol=1e-6, atol=0)


def test_gradients_reach_every_parameter():
    model = tiny_model(loop_mode="flt").train()
    idx = idx_for(model.config)
    model(idx, idx).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---- causality ---------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(mode=st.sampled_from(MODES), variant=st.sampled_from(list(VARIANTS)),
       n_loops=st.integers(1, 6), position=st.integers(0, 15), seed=st.integers(0, 10**6))
def test_causality(mode, variant, n_loops, position, seed):
    model = tiny_model(seed=seed % 7, loop_mode=mode, n_loops=n_loops, **VARIANTS[variant])
    idx = idx_for(model.config, batch=1, seq=16, seed=seed)
    changed = idx.clone()
    changed[0, position] = (idx[0, position] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :position], b[:, :position], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, position:], b[:, position:])


# ---- initialisation ----------------------------------------------------------------
def test_init_weights_follow_spec():
    cfg = ModelConfig(depth=2, d_model=256, n_head=2, vocab_size=5000, sequence_len=32,
                      attn_type="mla", kv_rank=64)
    model = LoopedGPT.from_config(cfg, seed=0)
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert wte.std().item() == pytest.approx(1.0, rel=0.02)
    assert head.std().item() == pytest.approx(0.001, rel=0.02)
    a, b = math.sqrt(3 / 256), math.sqrt(3 / 64)
    for block in model.transformer.h:
        for w, bound in [(block.attn.c_q.weight, a), (block.attn.c_kv_down.weight, a),
                         (block.attn.c_k_up.weight, b), (block.attn.c_v_up.weight, b),
                         (block.mlp.c_fc.weight, a)]:
            assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    # every block starts as the identity, so all modes agree at initialisation
    idx = idx_for(cfg)
    outs = [LoopedGPT(ModelConfig(**{**cfg.to_dict(), "loop_mode": m})) for m in MODES]
    for o in outs:
        o.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = outs[0](idx)
        assert all(torch.allclose(o(idx), ref) for o in outs[1:])


def test_meta_device_build_then_materialise():
    cfg = tiny_config()
    model = LoopedGPT.from_config(cfg, seed=3)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.isfinite(model(idx_for(cfg))).all()
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (cfg.rotary_len, 8)


def test_flops_count_every_loop():
    model = LoopedGPT(tiny_config())
    f1, f6 = model.estimate_flops(1), model.estimate_flops(6)
    block = sum(p.numel() for p in model.transformer.h.parameters())
    assert f6 - f1 > 5 * 6 * block  # each extra loop adds at least its matmul FLOPs


# ---- bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("bad,field", [
    (dict(loop_mode="flt2"), "loop_mode"),
    (dict(n_loops=0), "n_loops"),
    (dict(d_model=30, n_head=4), "n_head"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(window_pattern="LX"), "window_pattern"),
    (dict(window_pattern=""), "window_pattern"),
    (dict(window_size=0), "window_size"),
    (dict(window_size=2.5), "window_size"),
    (dict(full_last_layer="no"), "full_last_layer"),
    (dict(kv_rank=0), "kv_rank"),
    (dict(loss_loops="first"), "loss_loops"),
    (dict(attn_type="linear"), "attn_type"),
    (dict(residual_scale="sqrt"), "residual_scale"),
    (dict(residual_lambda=-1.0), "residual_lambda"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(depth=0), "depth"),
])
def test_config_rejects_bad_values(bad, field):
    with pytest.raises(ValueError, match=field) as err:
        tiny_config(**bad)
    assert repr(list(bad.values())[0]) in str(err.value)


# ---- sliding windows ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_window_settings_leave_presets_unchanged(name):
    """The window_size / full_last_layer defaults give the authors' rule: 'S' layers see
    sequence_len // 4 keys and the last layer is full."""
    config = ModelConfig.preset(name, window_pattern="SL")
    assert (config.window_size, config.full_last_layer) == (None, True)
    w = config.sequence_len // 4
    assert config.window_sizes() == [w if i % 2 == 0 else None for i in range(config.depth)]
    assert ModelConfig.preset(name).window_sizes() == [None] * config.depth
    assert ModelConfig.preset("tiny", window_pattern="S").window_sizes() == [64, None]


def test_window_size_and_full_last_layer():
    assert tiny_config(window_pattern="S", window_size=3).window_sizes() == [3, None]
    assert tiny_config(window_pattern="S", window_size=3,
                       full_last_layer=False).window_sizes() == [3, 3]
    # an old checkpoint's config (no such fields) loads with the defaults
    data = tiny_config(window_pattern="S").to_dict()
    del data["window_size"], data["full_last_layer"]
    assert ModelConfig.from_dict(data).window_sizes() == [6, None]


@pytest.mark.parametrize("mode", ["lt", "flt_res"])
def test_fully_windowed_model_reach_grows_by_loop(mode):
    """With every layer windowed (w keys), one loop of `depth` layers carries a token at
    most depth * (w - 1) positions on: changing the first token changes the last position's
    logits only once the loops reach it (why loops pay on the reach task)."""
    w, depth, T = 3, 2, 20
    model = tiny_model(loop_mode=mode, depth=depth, window_pattern="S", window_size=w,
                       full_last_layer=False, sequence_len=T)
    idx = torch.randint(1, 61, (1, T), generator=torch.Generator().manual_seed(0))
    other = idx.clone()
    other[0, 0] = (idx[0, 0] + 1) % 61
    per_loop = depth * (w - 1)  # 4: position 19 is reached by loop 5 (19 / 4 -> 5 loops)
    for n in range(1, 7):
        a = model(idx, n_loops=n)[0, -1]
        b = model(other, n_loops=n)[0, -1]
        assert torch.equal(a, b) == (n * per_loop < T - 1), n


def test_flt_carries_nothing_through_a_run_of_one_token():
    """FLT's state enters a loop only as attention queries; where every key in a window
    holds the same token the values are alike, so no query changes what a layer reads: a
    change before such a run reaches no farther than one loop's layers, whatever N (hence
    the reach task's open cells of several kinds). LT carries it on."""
    w, depth, T = 3, 2, 20
    idx = torch.full((1, T), 5)
    idx[0, 0] = 7
    other = idx.clone()
    other[0, 0] = 8
    for mode, reached in (("flt", False), ("lt", True)):
        model = tiny_model(loop_mode=mode, depth=depth, window_pattern="S", window_size=w,
                           full_last_layer=False, sequence_len=T)
        gap = (model(idx, n_loops=8)[0, -1] - model(other, n_loops=8)[0, -1]).abs().max()
        assert gap > 1e-3 if reached else gap < 1e-6, (mode, float(gap))


def test_config_suggests_close_mode():
    with pytest.raises(ValueError, match="did you mean 'flt'"):
        tiny_config(loop_mode="fl")


def test_config_round_trip_and_unknown_field():
    cfg = tiny_config(attn_type="mla", kv_rank=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


@pytest.mark.parametrize("make,match", [
    (lambda c: torch.zeros(1, c.rotary_len + 1, dtype=torch.long), "longer than the RoPE table"),
    (lambda c: torch.full((1, 4), c.vocab_size), "outside the vocabulary"),
    (lambda c: torch.full((1, 4), -2), "outside the vocabulary"),
    (lambda c: torch.zeros(1, 4), "dtype"),
    (lambda c: torch.zeros(4, dtype=torch.long), "shape"),
    (lambda c: torch.zeros(1, 0, dtype=torch.long), "shape"),
    (lambda c: [[1, 2, 3]], "torch.Tensor"),
])
def test_forward_rejects_bad_idx(make, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        model(make(model.config))


def test_forward_rejects_bad_targets_and_loops():
    model = tiny_model()
    idx = idx_for(model.config)
    with pytest.raises(ValueError, match="target id"):
        model(idx, torch.full_like(idx, model.config.vocab_size))
    with pytest.raises(ValueError, match="n_loops=0"):
        model(idx, n_loops=0)


def test_randomize_helper_changes_weights():
    model = LoopedGPT.from_config(tiny_config(), seed=0)
    randomize_(model)
    assert model.transformer.h[0].attn.c_proj.weight.abs().sum() > 0


# ---- the per-loop API and the loop-invariant first layer (issues 10, 16) -----------------
def test_first_layer_kv_invariant_modes():
    invariant = {name for name, mode in LOOP_MODES.items() if mode.first_layer_kv_invariant}
    assert invariant == {"flt", "ltai"}


def _without_first_kv(model):
    prepare = model.prepare

    def prepare_unshared(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        inputs.first_kv = None
        return inputs
    model.prepare = prepare_unshared
    return model


@pytest.mark.parametrize("mode", ["flt", "ltai"])
@pytest.mark.parametrize("variant", [dict(), dict(attn_type="mla", kv_rank=8), dict(n_kv_head=1)])
def test_shared_first_layer_kv_is_exact(mode, variant):
    """Computing the first layer's keys/values once per forward instead of once per loop
    gives bit-identical logits and the same gradients (to float rounding: the gradient
    contributions of the loops are summed in another order)."""
    shared = tiny_model(loop_mode=mode, n_loops=4, **variant)
    unshared = _without_first_kv(tiny_model(loop_mode=mode, n_loops=4, **variant))
    idx = torch.randint(0, shared.config.vocab_size, (2, 11))
    assert shared.prepare(idx).first_kv is not None
    assert torch.equal(shared(idx), unshared(idx))
    loss_a, loss_b = shared(idx, idx), unshared(idx, idx)
    assert torch.equal(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    for (name, a), b in zip(shared.named_parameters(), unshared.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_wrap_loops_runs_every_loop_through_the_wrapper():
    model = tiny_model(n_loops=3)
    seen = []

    def wrapper(loop_fn):
        def wrapped(inputs, previous, loop):
            seen.append(loop)
            return loop_fn(inputs, previous, loop)
        return wrapped
    idx = torch.randint(0, model.config.vocab_size, (1, 5))
    expected = model(idx)
    model.wrap_loops(wrapper)
    assert torch.equal(model(idx), expected) and seen == [0, 1, 2]
    model.wrap_loops(None)
    assert not model.loops_wrapped


def test_activation_checkpointing_runs_only_where_gradients_are_recorded(monkeypatch):
    """Issue 24, item 1: a checkpoint reads the RNG state, which a CUDA-graph capture
    forbids, so evaluation, decoding (a trainer's samples included) and the no-grad loops
    of truncated backprop must not checkpoint; training loops must."""
    from loopedlm.infer import DecodeEngine
    from loopedlm.infer.generate import generate
    from loopedlm.train import parallel

    calls = []
    checkpoint = parallel.checkpoint
    monkeypatch.setattr(parallel, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    model = parallel.apply_activation_checkpointing(tiny_model(n_loops=3).train())
    idx = idx_for(model.config)
    model(idx, idx).backward()
    assert len(calls) == 3
    model(idx, idx, backprop_loops=1).backward()
    assert len(calls) == 3 + 1
    calls.clear()
    with torch.no_grad():
        model(idx)
    generate(model, [1, 2, 3], max_tokens=3, dtype=torch.float64)  # a cast copy, like bf16
    engine = DecodeEngine(model, max_batch=1, graphs=True)  # the capture procedure
    engine.add(0, [1, 2, 3])
    engine.step()
    assert calls == []


def test_a_deepcopy_of_a_compiled_model_runs_its_own_weights():
    """Issue 24, item 11: the copy's compiled blocks must not call the original's."""
    import copy

    model = tiny_model().compile_blocks(backend="eager")
    idx = idx_for(model.config, seq=8)
    with torch.no_grad():
        before = model(idx)
        twin = copy.deepcopy(model)
        for p in twin.parameters():
            p.mul_(0.5)
        halved = tiny_model()  # the same weights, halved, eager
        for p in halved.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(twin(idx), halved(idx))
        assert torch.equal(model(idx), before)
        torch.testing.assert_close(copy.deepcopy(model).double()(idx), before)  # (fp32 logits)


# ---- the per-loop view -------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_loop_logits_are_the_forward_at_each_loop_count(mode):
    model = tiny_model(loop_mode=mode, n_loops=3)
    idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    logits, per_loop = model(idx, n_loops=5, return_loop_logits=True)
    assert per_loop.shape == (5, 2, 10, 61)
    assert torch.equal(per_loop[-1], logits)
    assert torch.equal(logits, model(idx, n_loops=5))  # the default outputs are unchanged
    for t in range(1, 6):  # no loop reads a later one
        torch.testing.assert_close(per_loop[t - 1], model(idx, n_loops=t), rtol=0, atol=0)


def test_loop_logits_with_residual_norms_and_not_with_targets():
    model = tiny_model(n_loops=3)
    idx = torch.randint(0, 61, (1, 8))
    logits, per_loop, norms = model(idx, return_loop_logits=True, return_residual_norms=True)
    assert per_loop.shape[0] == norms.shape[0] == 3
    assert torch.equal(norms, model(idx, return_residual_norms=True)[1])
    with pytest.raises(ValueError, match="return_loop_logits=True is for logits"):
        model(idx, idx, return_loop_logits=True)
