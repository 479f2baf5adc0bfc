"""The optimiser recipe (docs/design.md#training-recipe): parameter groups, rates, schedule,
Muon's update rule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm.common.validation import ConfigError
from loopedlm.train.optim import LoopedOptimizer, OptimConfig, lr_multiplier, muon_momentum


def test_groups_cover_every_parameter_once():
    model = tiny_model()
    opt = LoopedOptimizer(model, OptimConfig())
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    muon_params = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    assert all(p.ndim == 2 for p in model.transformer.h.parameters())


@pytest.mark.parametrize("d_model", [32, 64])
@pytest.mark.parametrize("lr_scale", [1.0, 0.25])
def test_rates_scale_with_width_and_lr_scale(d_model, lr_scale):
    model = tiny_model(d_model=d_model)
    opt = LoopedOptimizer(model, OptimConfig(lr_scale=lr_scale, lm_head_lr=0.01))
    rates = opt.set_step(0, 100)
    width = (d_model / 768) ** -0.5
    assert rates["lr/matrix"] == pytest.approx(0.02 * lr_scale)
    assert rates["lr/embedding"] == pytest.approx(0.2 * width * lr_scale)
    assert rates["lr/lm_head"] == pytest.approx(0.01 * width * lr_scale)  # per-group override
    adam = opt.adamw.param_groups[0]
    assert adam["betas"] == (0.8, 0.95) and adam["eps"] == 1e-10 and adam["weight_decay"] == 0
    muon = opt.muon.param_groups[0]
    assert muon["nesterov"] and muon["ns_steps"] == 5 and muon["weight_decay"] == 0
    assert muon["adjust_lr_fn"] == "original"


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 5000), warmdown=st.floats(0.0, 1.0))
def test_trapezoid_shape(total, warmdown):
    cfg = OptimConfig(warmdown_ratio=warmdown)
    values = [lr_multiplier(s, total, cfg) for s in range(total)]
    assert all(0 <= v <= 1 for v in values)
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))  # never rises
    constant = total - round(warmdown * total)
    assert all(v == 1.0 for v in values[:constant + 1])  # no warm-up, flat first part
    tail = values[constant:]
    if len(tail) > 2:  # linear: equal decrements, heading for 0 at step `total`
        steps = [a - b for a, b in zip(tail, tail[1:], strict=False)]
        assert max(steps) - min(steps) < 1e-9
        assert tail[-1] == pytest.approx(steps[0], abs=1e-9)


def test_momentum_warmup():
    cfg = OptimConfig()
    assert muon_momentum(0, cfg) == pytest.approx(0.85)
    assert muon_momentum(150, cfg) == pytest.approx(0.90)
    assert muon_momentum(300, cfg) == pytest.approx(0.95)
    assert muon_momentum(10_000, cfg) == pytest.approx(0.95)


def _nanochat_muon_step(p, g, buf, lr, momentum):
    """nanochat's Muon (gpt.py/muon.py) for one matrix, written out as a reference."""
    buf.lerp_(g, 1 - momentum)
    g = g.lerp(buf, momentum)  # Nesterov
    X = g.bfloat16()
    if g.size(-2) > g.size(-1):
        X = X.mT
    X = X / (X.norm() + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if g.size(-2) > g.size(-1):
        X = X.mT
    p.add_(X.to(p.dtype), alpha=-lr * max(1, p.size(-2) / p.size(-1)) ** 0.5)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_torch_muon_matches_nanochat(shape):
    torch.manual_seed(0)
    p1 = torch.randn(shape, requires_grad=True)
    p2 = p1.detach().clone()
    buf = torch.zeros(shape)
    opt = torch.optim.Muon([p1], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
                           adjust_lr_fn="original")
    for _ in range(3):
        g = torch.randn(shape)
        p1.grad = g.clone()
        opt.step()
        _nanochat_muon_step(p2, g, buf, 0.02, 0.95)
    # bf16 Newton-Schulz: agreement to bf16 precision of a 0.02-sized step
    assert torch.allclose(p1.detach(), p2, atol=2e-3, rtol=0)
    assert (p1.detach() - p2).abs().max() < 0.1 * 0.02 * math.sqrt(3)


def test_state_dict_round_trip():
    model = tiny_model()
    opt = LoopedOptimizer(model, OptimConfig())
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    model(x, x).backward()
    opt.set_step(0, 10)
    opt.step()
    state = opt.state_dict()
    opt2 = LoopedOptimizer(model, OptimConfig())
    opt2.load_state_dict(state)
    for a, b in zip(opt.optimizers, opt2.optimizers, strict=True):
        for pa, pb in zip(a.state.values(), b.state.values(), strict=True):
            for key in pa:
                assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key]))


@pytest.mark.parametrize("field, value", [("matrix_lr", -1.0), ("lr_scale", 0), ("adam_beta1", 1.5),
                                          ("warmdown_ratio", 2.0), ("muon_ns_steps", -1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"optim.{field}="):
        OptimConfig(**{field: value})
