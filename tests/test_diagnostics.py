"""Diagnostics (SPEC 6): collapse detection on synthetic loss curves, gradient norms,
bits-per-byte, MFU."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm.diagnostics import (
    CollapseDetector,
    CollapseThresholds,
    evaluate_bpb,
    grad_norms,
    mfu,
    peak_flops,
    watched_parameters,
)


def healthy(n: int, seed: int, noise: float = 0.02) -> list[float]:
    """A converging curve: fast exponential descent to a floor, multiplicative noise."""
    rng = random.Random(seed)
    return [(3.0 + 6.0 * math.exp(-i / 60)) * (1 + rng.gauss(0, noise)) for i in range(n)]


def run(curve: list[float], **thresholds) -> CollapseDetector:
    detector = CollapseDetector(CollapseThresholds(**thresholds))
    for step, loss in enumerate(curve, start=1):
        detector.update(step, loss)
    return detector


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 0.03))
def test_healthy_curves_are_not_flagged(seed, noise):
    detector = run(healthy(600, seed, noise))
    assert detector.status() == "ok", detector.events


def test_converged_flat_curve_is_not_a_plateau():
    # flat because finished, not because stuck high: the gap condition keeps it quiet
    assert run([3.0 + 0.01 * math.sin(i) for i in range(500)]).status() == "ok"


def test_high_plateau_after_blowup_is_flagged():
    curve = healthy(300, 0) + [7.5 * (1 + 0.005 * math.sin(i)) for i in range(300)]
    detector = run(curve)
    kinds = {e.kind for e in detector.events}
    assert "plateau" in kinds and detector.status() == "flagged"
    first_plateau = min(e.step for e in detector.events if e.kind == "plateau")
    assert first_plateau > 300  # not before the blow-up


def test_severe_swings_are_flagged():
    rng = random.Random(1)
    curve = healthy(200, 0) + [4.0 * (1 + 0.4 * rng.choice([-1, 1])) for _ in range(100)]
    kinds = {e.kind for e in run(curve).events}
    assert "swings" in kinds


def test_single_spike_is_flagged():
    curve = healthy(200, 0)
    curve[150] *= 2.5
    events = run(curve).events
    assert [e.kind for e in events] == ["spike"] and events[0].step == 151


def test_nonfinite_is_collapse():
    detector = run(healthy(20, 0) + [float("nan")])
    assert detector.status() == "collapsed" and detector.events[-1].kind == "nonfinite"
    assert run([float("inf")]).nonfinite


def test_thresholds_matter():
    curve = healthy(200, 0)
    curve[150] *= 1.3
    assert run(curve).status() == "ok"
    assert run(curve, spike_ratio=0.2).status() == "flagged"


def test_state_round_trip_gives_same_events():
    curve = healthy(300, 0) + [7.5] * 200
    whole = run(curve)
    first = run(curve[:250])
    second = CollapseDetector(CollapseThresholds())
    second.load_state_dict(first.state_dict())
    for step, loss in enumerate(curve[250:], start=251):
        second.update(step, loss)
    assert [e.to_dict() for e in second.events] == [e.to_dict() for e in whole.events]


def test_grad_norms_match_manual():
    model = tiny_model()
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    model(x, x).backward()
    groups = watched_parameters(model)
    norms = grad_norms(groups)
    assert set(norms) == {"first_mlp", "lm_head", "middle_mlp", "middle_attn"}
    manual = torch.cat([p.grad.flatten() for p in model.transformer.h[0].mlp.parameters()]).norm()
    assert norms["first_mlp"] == pytest.approx(float(manual), rel=1e-5)
    assert norms["lm_head"] == pytest.approx(float(model.lm_head.weight.grad.norm()), rel=1e-5)


class _ListLoader:
    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        if not self.batches:
            raise StopIteration
        return self.batches.pop(0)

    def __iter__(self):
        return self

    def __next__(self):
        return self.next_batch()


def test_bpb_matches_definition():
    model = tiny_model().eval()
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (2, 8), generator=gen),
                torch.randint(0, V, (2, 8), generator=gen)) for _ in range(3)]
    batches[1][1][0, :3] = -1  # masked targets count in neither sum
    token_bytes = torch.randint(0, 4, (V,), generator=gen)  # 0 = special token
    nats = nbytes = 0.0
    with torch.no_grad():
        for x, y in batches:
            logp = torch.log_softmax(model(x).float(), -1)
            for b in range(y.size(0)):
                for t in range(y.size(1)):
                    tok = int(y[b, t])
                    if tok >= 0 and token_bytes[tok] > 0:
                        nats -= float(logp[b, t, tok])
                        nbytes += int(token_bytes[tok])
    expected = nats / (math.log(2) * nbytes)
    got = evaluate_bpb(model, _ListLoader(batches), token_bytes, steps=None)
    assert got == pytest.approx(expected, rel=1e-5)
    # `steps` limits the batches read
    one = evaluate_bpb(model, _ListLoader(batches), token_bytes, steps=1)
    assert one != pytest.approx(got)


def test_mfu_and_peak():
    assert peak_flops("cpu") is None
    assert mfu(1e9, 1000.0, None) is None
    assert mfu(1e9, 1000.0, 1e13, world_size=2) == pytest.approx(1e12 / 2e13)


@pytest.mark.parametrize("field, value", [("plateau_window", 1), ("spike_ratio", -0.1),
                                          ("min_steps", 1.5)])
def test_bad_thresholds_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"collapse.{field}="):
        CollapseThresholds(**{field: value})
