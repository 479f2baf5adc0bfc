"""Variable-loop training and truncated backprop through loops (issue 14): the loop-count
samplers, `forward(backprop_loops=)`, the FLOPs counting, the trainer's per-step N (logged,
the same on resume) and the bad-input errors."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from train_helpers import MODEL, FakeTokenizer, SyntheticData, losses

from loopedlm.common.validation import ConfigError
from loopedlm.model.attention import norm
from loopedlm.train.config import TrainConfig
from loopedlm.train.loop_sampling import LoopSampling, poisson_cap
from loopedlm.train.sizing import expected_flops_per_token, horizon
from loopedlm.train.trainer import train


# ---- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize("value, words", [
    ("fixd", "'fixd'"), ("uniform:3", "'uniform:3'"), ("uniform:a,4", "integer"),
    ("uniform:1,2,3", "'uniform:1,2,3'"), ("poisson_lognormal", "'poisson_lognormal'"),
    ("poisson_lognormal:x", "numbers"), ("fixed:3", "'fixed:3'"), ("", "''"),
    ("uniform:5,2", "A=5 > B=2"), ("uniform:0,2", "A=0 must be >= 1"),
    ("poisson_lognormal:0.5", "MEAN=0.5 must be >= 1"),
    ("poisson_lognormal:6,0", "SIGMA=0 must be > 0"), (3, "loop_sampling=3"),
])
def test_bad_loop_sampling_names_the_value(value, words):
    with pytest.raises(ConfigError, match=r"loop_sampling=.*" ) as err:
        TrainConfig(loop_sampling=value)
    assert words in str(err.value)


@pytest.mark.parametrize("sampling, largest", [
    ("fixed", 3), ("uniform:2,5", 5), ("poisson_lognormal:4", poisson_cap(4))])
def test_backprop_loops_at_most_the_largest_n(sampling, largest):
    model = {"n_loops": 3}
    TrainConfig(loop_sampling=sampling, backprop_loops=largest, model=model)  # allowed
    with pytest.raises(ConfigError, match=f"backprop_loops={largest + 1} .*at most the "
                                          f"largest loop count, {largest}"):
        TrainConfig(loop_sampling=sampling, backprop_loops=largest + 1, model=model)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_backprop_loops_must_be_a_non_negative_integer(value):
    with pytest.raises(ConfigError, match=f"backprop_loops={value!r} is not allowed"):
        TrainConfig(backprop_loops=value)


def test_truncated_backprop_refused_for_lt():
    with pytest.raises(ConfigError, match="backprop_loops=1 .*'lt'"):
        TrainConfig(backprop_loops=1, model={"loop_mode": "lt"})


def test_forward_rejects_bad_backprop_loops():
    model = tiny_model()
    x = torch.randint(0, 61, (1, 5))
    for bad in (-2, 1.0, True, None):
        with pytest.raises(ValueError, match=f"backprop_loops={bad!r}"):
            model(x, x, backprop_loops=bad)


# ---- the samplers ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ["fixed", "uniform:2,7", "poisson_lognormal:6",
                                  "poisson_lognormal:3,1.0", "poisson_lognormal:1"])
def test_sampler_is_a_function_of_seed_and_step(text):
    sampler = LoopSampling.parse(text, 4)
    draws = [sampler.sample(7, step) for step in range(400)]
    assert draws == [sampler.sample(7, step) for step in range(400)]  # no hidden state
    assert all(isinstance(n, int) and 1 <= n <= sampler.max_loops for n in draws)
    dist = sampler.distribution()
    assert sum(dist.values()) == pytest.approx(1.0)
    assert set(draws) <= set(dist)
    if sampler.variable and sampler.mean != 1:
        assert draws != [sampler.sample(8, step) for step in range(400)]  # seeded
        # the empirical mean agrees with the exact one (4000 draws: 5 standard errors)
        many = [sampler.sample(0, step) for step in range(4000)]
        sd = statistics.pstdev(many)
        assert abs(statistics.fmean(many) - sampler.expected_loops()) < 5 * sd / 4000**0.5


def test_sampler_expectations():
    assert LoopSampling.parse("fixed", 5).expected_loops() == 5
    assert LoopSampling.parse("uniform:2,6", 5).expected_loops() == pytest.approx(4)
    huginn = LoopSampling.parse("poisson_lognormal:6", 5)
    # MEAN is the mean of N before the cap; the cap only pulls the tail in
    assert 5.8 < huginn.expected_loops() < 6.0 and huginn.max_loops == 18
    assert LoopSampling.parse("poisson_lognormal:1", 5).distribution() == {1: 1.0}


# ---- truncated backprop through loops ---------------------------------------------------
def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()]


@pytest.mark.parametrize("mode", ["flt", "lti", "ltai", "flt_res"])
def test_backprop_loops_equals_full_at_0_and_k_equal_n_and_a_manual_detach_below(mode):
    model = tiny_model(loop_mode=mode).train()
    x = torch.randint(0, 61, (2, 10))
    y = torch.randint(0, 61, (2, 10))
    n, k = 5, 2
    full = _grads(model, model(x, y, n_loops=n))
    for every_loop in (0, n):
        assert all(torch.equal(a, b) for a, b in zip(
            full, _grads(model, model(x, y, n_loops=n, backprop_loops=every_loop)), strict=True))
    cut = model(x, y, n_loops=n, backprop_loops=k)
    truncated = _grads(model, cut)

    # the same loops with h^{N-k} detached by hand
    inputs = model.prepare(x)
    previous = None
    for loop in range(n):
        previous = norm(model.loop(inputs, previous, loop))
        if loop == n - k - 1:
            previous = previous.detach()
    manual_loss = F.cross_entropy(model.logits(previous).flatten(0, 1), y.flatten())
    manual = _grads(model, manual_loss)
    # the model's loss runs through the fused head: equal to float rounding
    torch.testing.assert_close(cut.detach(), manual_loss.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(truncated, manual, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    # the earlier loops' contribution is really cut
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-5)
               for a, b in zip(truncated, full, strict=True))


def test_supervised_loops_outside_the_window_leave_the_loss():
    model = tiny_model(loss_loops="all").train()
    x = torch.randint(0, 61, (2, 8))
    n, k = 6, 2
    loss = model(x, x, n_loops=n, backprop_loops=k)
    inputs, previous, per_loop = model.prepare(x), None, []
    with torch.no_grad():
        for loop in range(n):
            previous = norm(model.loop(inputs, previous, loop))
            per_loop.append(F.cross_entropy(model.logits(previous).flatten(0, 1), x.flatten()))
    assert loss.item() == pytest.approx(torch.stack(per_loop[n - k:]).mean().item(), rel=1e-6)
    assert list(model.supervised_loops(n, k)) == [4, 5]
    assert list(model.supervised_loops(n, 10)) == list(range(6))


def _saved_bytes(model, x, n, k):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x, n_loops=n, backprop_loops=k)
    return total


def test_no_grad_prefix_saves_no_activations():
    model = tiny_model().train()
    x = torch.randint(0, 61, (2, 16))
    # with k = 2 the graph does not grow with N; without truncation it does
    assert _saved_bytes(model, x, 3, 2) == _saved_bytes(model, x, 9, 2)
    assert _saved_bytes(model, x, 9, 0) > 2 * _saved_bytes(model, x, 3, 0)


def test_flops_count_the_backward_only_where_gradients_flow():
    model = tiny_model()
    assert model.estimate_flops(6, 0) == model.estimate_flops(6) == model.estimate_flops(6, 6)
    assert model.estimate_flops(6, 2) < model.estimate_flops(6)
    # forward is a third of forward + backward: each extra no-grad loop costs a third
    # of an extra full loop
    per_loop = model.estimate_flops(7) - model.estimate_flops(6)
    assert model.estimate_flops(7, 2) - model.estimate_flops(6, 2) == pytest.approx(per_loop / 3)


def test_flops_budget_horizon_uses_the_expected_loop_count():
    from loopedlm import LoopedGPT
    base = dict(model=dict(MODEL, vocab_size=300, n_loops=6), total_batch_tokens=256,
                flops_budget=1e12)
    fixed = TrainConfig(**base)
    model = LoopedGPT.from_config(fixed.model_config(), seed=0)
    uniform = TrainConfig(**base, loop_sampling="uniform:1,11")  # mean 6, as fixed
    truncated = TrainConfig(**base, loop_sampling="uniform:1,11", backprop_loops=2)
    # loss_loops='last': FLOPs are linear in N, so the mean N gives the same horizon
    assert horizon(uniform, model) == horizon(fixed, model)
    assert expected_flops_per_token(uniform, model) == pytest.approx(model.estimate_flops(6))
    assert horizon(truncated, model) > horizon(fixed, model)


# ---- the trainer --------------------------------------------------------------------------
def _config(run_dir, **overrides):
    values = dict(run_dir=str(run_dir), model=dict(MODEL, n_loops=3), total_batch_tokens=256,
                  device_batch_size=8, steps=6, eval_every=0, eval_tokens=256, save_every=3,
                  keep_last=5, device="cpu", progress=False, sample_tokens=4,
                  loop_sampling="uniform:1,4", backprop_loops=2, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_training_logs_the_sampled_n_and_resumes_with_the_same(tmp_path):
    cfg = _config(tmp_path / "run")
    summary = train(cfg, data=SyntheticData(), tokenizer=FakeTokenizer())
    rows = [r for r in _records(tmp_path / "run") if "loss" in r]
    sampler = cfg.loop_sampler(cfg.model_config().n_loops)
    assert [r["n_loops"] for r in rows] == [sampler.sample(3, s) for s in range(6)]
    assert len({r["n_loops"] for r in rows}) > 1  # really variable
    from loopedlm import LoopedGPT
    model = LoopedGPT.from_config(cfg.model_config(vocab_size=64), seed=0)
    for r in rows:
        assert len(r["residual_norm"]) == r["n_loops"]
        assert r["flops_per_token"] == model.estimate_flops(r["n_loops"], 2)
    assert summary["session_train_flops"] == pytest.approx(
        sum(r["flops_per_token"] for r in rows) * 256)
    assert summary["flops_per_token"] == pytest.approx(expected_flops_per_token(cfg, model))
    assert summary["loop_sampling"] == "uniform:1,4" and summary["backprop_loops"] == 2
    assert "peak_memory_bytes" in summary

    # stop after step 3, resume: the same Ns and the same losses, step for step
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    (resumed / "summary.json").unlink()
    train(_config(resumed, resume=True), data=SyntheticData(), tokenizer=FakeTokenizer())
    assert losses(resumed) == losses(tmp_path / "run")
    assert [r["n_loops"] for r in _records(resumed) if "loss" in r] == [r["n_loops"]
                                                                       for r in rows]

    from loopedlm.experiments.plot import plot_runs  # per-loop norms of varying length
    assert len(plot_runs([tmp_path / "run"], tmp_path / "plots")) == 3


# ---- the report section ----------------------------------------------------------------
def _fake_variable_run(sweep_dir, name, settings, bpb_at, seed):
    run = sweep_dir / name
    (run / "eval").mkdir(parents=True)
    rows = [{"step": s, "loss": 5.0 / s, "dt": 0.5, "n_loops": 2 + s % 3,
             "residual_norm": [1.0] * (2 + s % 3)} for s in range(1, 5)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "step": 4, "final_loss": 1.25, "val_bpb": bpb_at(6),
        "total_wall_time_s": 1.0, "peak_memory_bytes": 2**20 * (10 + seed),
        "peak_memory_method": "test", "collapse": {"status": "ok"}}))
    loops = [1, 3, 6, 12]
    (run / "eval" / "results.json").write_text(json.dumps({"loops": loops, "metrics": {
        "val_bpb": {str(n): bpb_at(n) + 0.001 * seed for n in loops}}}))
    return {"name": name, "settings": {**settings, "seed": seed}, "status": "completed"}


@pytest.mark.parametrize("high_delta, high_verdict", [
    (-0.05, "beats"), (0.05, "loses to"), (0.0001, "does not beat `fixed N=6`: the difference is within")])
def test_report_section_states_the_verdict_from_the_data(tmp_path, high_delta, high_verdict):
    from loopedlm.experiments.report.write import write_report
    rows = []
    for seed in range(3):
        rows.append(_fake_variable_run(
            tmp_path, f"fixed-{seed}", {"loop_sampling": "fixed", "model.n_loops": 6,
                                        "total_batch_tokens": 100},
            lambda n: 2.0, seed))
        rows.append(_fake_variable_run(
            tmp_path, f"var-{seed}", {"loop_sampling": "poisson_lognormal:6",
                                      "model.n_loops": 6, "total_batch_tokens": 100},
            lambda n: 2.0 + (0.05 if n < 6 else high_delta if n > 6 else 0), seed))
    (tmp_path / "sweep.json").write_text(json.dumps({"experiment": "variable_loops",
                                                     "runs": rows, "command": "x"}))
    text = write_report(tmp_path).read_text()
    assert "| fixed N=6 | 3 | 2.0010 ± 0.0010 |" in text
    assert "| fixed N=6 | 200 ± 0 | 3.00 ± 0.00 | 11.0 ± 1.0 |" in text  # 100 tokens / 0.5 s
    low = next(line for line in text.splitlines() if line.startswith("- **low"))
    high = next(line for line in text.splitlines() if line.startswith("- **high"))
    assert "loses to `fixed N=6` (lower mean BPB at 0 of 2" in low
    assert "N=1: 2.0510 vs 2.0010 (+0.0500, noise ±0.0016; paired by seed +0.0500 ± 0.0000 over 3)" in low
    assert f"`poisson_lognormal:6` {high_verdict}" in high
    assert (tmp_path / "variable_loops_bpb.png").stat().st_size > 1000
