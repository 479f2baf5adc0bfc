"""The training loop (issue 4): configuration, an end-to-end run, horizons, collapse stop."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from train_helpers import MODEL, FakeTokenizer, SyntheticData, losses, small_config

from loopedlm.model.checkpoint import latest_training_checkpoint, load_model
from loopedlm.train.config import TrainConfig, build_config, parse_train_args
from loopedlm.train.sizing import check_batch, horizon
from loopedlm.train.trainer import TrainingCollapsed, train


# ---- configuration ---------------------------------------------------------------------
def test_overrides_parse_types_and_sections():
    recipe, over = parse_train_args(["tiny", "--steps=7", "--model.n_loops=4", "--resume",
                                    "--optim.lr_scale=0.5", "--tokenizer=bpe:512",
                                    "--flops_budget=1e15"])
    assert recipe == "tiny"
    assert over == {"steps": 7, "model": {"n_loops": 4}, "resume": True,
                    "optim": {"lr_scale": 0.5}, "tokenizer": "bpe:512", "flops_budget": 1e15}
    cfg = build_config("tiny", {"steps": 7, "model": {"n_loops": 4}, "optim": {"lr_scale": 2}})
    assert cfg.steps == 7 and cfg.model["n_loops"] == 4 and cfg.model_config().n_loops == 4
    assert cfg.optim.lr_scale == 2.0 and isinstance(cfg.optim.lr_scale, float)


@pytest.mark.parametrize("overrides, words", [
    ({"stpes": 3}, ["stpes", "did you mean steps"]),
    ({"model": {"n_loop": 3}}, ["model.n_loop", "model.n_loops"]),
    ({"optim": {"matrx_lr": 0.1}}, ["optim.matrx_lr", "optim.matrix_lr"]),
    ({"dtype": "fp16"}, ["dtype", "fp16", "bfloat16"]),
    ({"steps": 0}, ["steps=0", ">= 1"]),
    ({"steps": 5, "flops_budget": 1e12}, ["steps=5", "flops_budget", "contradict"]),
    ({"model": {"loop_mode": "flx"}}, ["loop_mode", "flx", "flt"]),
    ({"tokenizer": "bpe:12"}, ["tokenizer", "bpe:12"]),
    ({"preset": "tinny"}, ["preset", "tiny"]),
])
def test_config_errors_name_field_and_allowed(overrides, words):
    with pytest.raises(ValueError) as info:
        cfg = build_config("tiny", overrides)
        cfg.model_config()
    for word in words:
        assert word in str(info.value)


def test_unknown_recipe_and_section():
    with pytest.raises(FileNotFoundError, match="tiny"):
        build_config("tinyy")
    with pytest.raises(ValueError, match="sections"):
        parse_train_args(["--modle.depth=3"])


def test_batch_must_divide():
    cfg = TrainConfig(total_batch_tokens=1000, device_batch_size=4)
    with pytest.raises(ValueError, match="not divisible.*4 x 32 x 2"):
        check_batch(cfg, 32, 2)
    assert check_batch(TrainConfig(total_batch_tokens=1024, device_batch_size=4), 32, 2) == 4


def test_errors_before_compute(tmp_path, corpus):
    data_dir, tok_dir = corpus
    with pytest.raises(ValueError, match="sequence_len=64 is longer"):
        train(small_config(tmp_path / "a", data_dir, tok_dir, sequence_len=64))
    with pytest.raises(ValueError, match="not divisible"):
        train(small_config(tmp_path / "b", data_dir, tok_dir, total_batch_tokens=100))
    with pytest.raises(FileNotFoundError, match="no complete training checkpoint"):
        train(small_config(tmp_path / "c", data_dir, tok_dir, resume=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_horizons():
    from loopedlm import LoopedGPT
    cfg = TrainConfig(model=dict(MODEL, vocab_size=300), total_batch_tokens=256)
    model = LoopedGPT.from_config(cfg.model_config(), seed=0)
    n_all, n_ne = model.num_params(), model.num_params(exclude_embedding=True)
    assert horizon(cfg, model) == round(20 * n_all / 256)
    cfg.param_basis = "non_embedding"
    assert horizon(cfg, model) == round(20 * n_ne / 256)
    cfg.flops_budget = 1e12
    assert horizon(cfg, model) == round(1e12 / model.estimate_flops() / 256)
    # the FLOPs horizon counts every loop: twice the loops, about half the steps
    cfg2 = TrainConfig(model=dict(MODEL, vocab_size=300, n_loops=4), total_batch_tokens=256,
                       flops_budget=1e12)
    model2 = LoopedGPT.from_config(cfg2.model_config(), seed=0)
    assert horizon(cfg2, model2) < horizon(cfg, model)


# ---- end to end ------------------------------------------------------------------------
def test_end_to_end_writes_everything(tmp_path, corpus):
    data_dir, tok_dir = corpus
    run = tmp_path / "run"
    summary = train(small_config(run, data_dir, tok_dir, steps=6, save_every=2, keep_last=2))
    assert summary["status"] == "completed" and summary["step"] == 6
    assert summary["val_bpb"] > 0 and isinstance(summary["sample"], str)
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    first = steps[0]
    for key in ("lr/matrix", "lr/embedding", "lr/lm_head", "muon_momentum", "tokens_per_s",
                "grad_norm/first_mlp", "grad_norm/lm_head", "grad_norm/middle_mlp",
                "grad_norm/middle_attn"):
        assert key in first and first[key] is not None
    assert len(first["residual_norm"]) == MODEL["n_loops"]
    assert first["mfu"] is None  # CPU: peak FLOPs unknown
    assert [r["step"] for r in records if "val_bpb" in r] == [3, 6]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004",
                                                                        "step_000006"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == 6 and saved["model"]["depth"] == 2
    assert json.loads((run / "summary.json").read_text())["collapse"]["status"] == "ok"
    model, meta = load_model(run)
    assert meta["step"] == 6 and model.config.vocab_size == 300
    assert (run / "tokenizer").is_dir()
    from loopedlm.experiments.plot import plot_runs
    pngs = plot_runs([run, run], tmp_path / "plots")
    assert [p.name for p in pngs] == ["loss.png", "residual_norm.png", "grad_norm.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)
    # the trapezoid: constant for the first 80%, never increasing
    lrs = [r["lr/matrix"] for r in steps]
    assert lrs[0] == lrs[3] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_existing_run_needs_resume_and_same_model(tmp_path, corpus):
    data_dir, tok_dir = corpus
    run = tmp_path / "run"
    train(small_config(run, data_dir, tok_dir, steps=3))
    with pytest.raises(ValueError, match="--resume"):
        train(small_config(run, data_dir, tok_dir, steps=3))
    other = dict(MODEL, n_loops=3)
    with pytest.raises(ValueError, match="n_loops: checkpoint 2 != config 3"):
        train(small_config(run, data_dir, tok_dir, steps=6, resume=True, model=other))


@pytest.mark.parametrize("log_every", [1, 4])  # 4: step 5 is read back at step 6's flush
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch,
                                                             log_every):
    from loopedlm.model.gpt import LoopedGPT
    data_dir, tok_dir = corpus
    calls = {"n": 0}
    forward = LoopedGPT.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 4:  # 2 micro-batches per step: step 5 goes NaN
                loss, norms = out
                return loss * float("nan"), norms
        return out

    monkeypatch.setattr(LoopedGPT, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingCollapsed, match="non-finite.*step 5.*step_000003"):
        train(small_config(run, data_dir, tok_dir, steps=6, save_every=3, log_every=log_every))
    assert latest_training_checkpoint(run).name == "step_000003"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "collapsed" and summary["collapse"]["status"] == "collapsed"
    assert summary["step"] == 4 and summary["collapse"]["events"][0]["step"] == 5
    assert max(losses(run)) == 4
    assert summary["collapse"]["events"][0]["kind"] == "nonfinite"


def test_synthetic_source_learns(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), model=dict(MODEL), total_batch_tokens=512,
                      device_batch_size=8, steps=12, eval_every=0, eval_tokens=256,
                      save_every=0, device="cpu", progress=False, sample_tokens=4)
    summary = train(cfg, data=SyntheticData(), tokenizer=FakeTokenizer())
    curve = losses(tmp_path / "run")
    assert curve[12] < curve[1] - 0.5
    assert summary["val_bpb"] < 6.0  # uniform over 63 tokens is log2(63) = 5.98 bits/byte


def test_activation_checkpointing_same_loss_and_grads():
    from conftest import tiny_model

    from loopedlm.train.parallel import apply_activation_checkpointing, remove_activation_checkpointing
    model = tiny_model()
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    loss, norms = model(x, x, return_residual_norms=True)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model)
    loss2, norms2 = model(x, x, return_residual_norms=True)
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(norms, norms2)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, atol=1e-6, rtol=1e-5)
    assert not remove_activation_checkpointing(model).loops_wrapped


def test_run_with_activation_checkpointing(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), model=dict(MODEL), total_batch_tokens=256,
                      device_batch_size=8, steps=3, eval_every=0, eval_tokens=256,
                      save_every=0, device="cpu", progress=False, sample_tokens=4,
                      activation_checkpointing=True)
    plain = TrainConfig(**{**cfg.to_dict(), "run_dir": str(tmp_path / "plain"),
                           "activation_checkpointing": False})
    train(cfg, data=SyntheticData(), tokenizer=FakeTokenizer())
    train(plain, data=SyntheticData(), tokenizer=FakeTokenizer())
    a, b = losses(tmp_path / "run"), losses(tmp_path / "plain")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)


# ---- host syncs and recompiles (issue 24) ------------------------------------------------
def _four_step_config(run_dir: Path, **overrides) -> TrainConfig:
    """The run that produced tests/fixtures/train-4-steps-log.jsonl before the step loop
    kept its figures on the device: variable N, clipping, evaluation, a collapse flag."""
    values = dict(run_dir=str(run_dir), model={**MODEL, "n_loops": 3}, total_batch_tokens=256,
                  device_batch_size=4, steps=4, eval_every=2, eval_tokens=256, save_every=0,
                  device="cpu", progress=False, sample_tokens=4, loop_sampling="uniform:1,3",
                  seed=3, collapse={"min_steps": 0, "swing_window": 2, "spike_ratio": 0.0,
                                    "swing_rel_dev": 0.0})
    values.update(overrides)
    return TrainConfig(**values)


def _records_without_timings(run_dir: Path) -> list[dict]:
    records = [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    for record in records:
        for key in ("tokens_per_s", "dt", "mfu"):
            record.pop(key, None)
    return records


def _same_records(got: list[dict], expected: list[dict], rel: float) -> None:
    """The same records (steps and keys), their numbers within `rel`, the rest equal."""
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in expected]
    for g, e in zip(got, expected, strict=True):
        for key in e:
            numbers = isinstance(e[key], float) or (isinstance(e[key], list) and all(
                isinstance(x, float) for x in e[key]))
            same = g[key] == pytest.approx(e[key], rel=rel) if numbers else g[key] == e[key]
            assert same, (g["step"], key, g[key], e[key])


# the golden log was written on one CPU; another's kernels (AVX-512 against AVX2 matmuls)
# round differently: up to 8e-5 relative on a sub-block's gradient norm, measured
GOLDEN_REL = 1e-3


@pytest.mark.parametrize("log_every", [1, 2])
def test_logged_figures_are_unchanged_by_reading_them_once_per_interval(tmp_path, log_every,
                                                                      caplog):
    """Every figure of log.jsonl equals what the per-step reads wrote (apart from the
    timings): to the last bits against a run reading every step in this process, and,
    within other CPUs' rounding, against the golden log written before the reads were
    deferred. With log_every=2 the records are those of steps 2 and 4, plus step 3, whose
    collapse flag is written whatever the interval. The head's backend is logged once."""
    with caplog.at_level("INFO"):
        train(_four_step_config(tmp_path / "run", log_every=log_every), data=SyntheticData(),
              tokenizer=FakeTokenizer())
    assert caplog.text.count("LM head loss: chunked, fp32 accumulation, eager") == 1
    before = [json.loads(x) for x in
              (Path(__file__).parent / "fixtures" / "train-4-steps-log.jsonl").read_text()
              .splitlines()]

    def kept(records: list[dict]) -> list[dict]:
        return [r for r in records if "loss" not in r or r["step"] % log_every == 0
                or "collapse_flags" in r]

    got = _records_without_timings(tmp_path / "run")
    _same_records(got, kept(before), GOLDEN_REL)
    if log_every > 1:
        train(_four_step_config(tmp_path / "every", log_every=1), data=SyntheticData(),
              tokenizer=FakeTokenizer())
        _same_records(got, kept(_records_without_timings(tmp_path / "every")), 1e-12)


@pytest.fixture
def _cheap_compile(monkeypatch):
    """Dynamo's guards and variants, without AOT autograd or code generation (the backend is
    given to torch.compile itself: a forced backend, `torch.compiler.set_stance`, would
    drop the per-call recompile limit)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield counters
    torch._dynamo.reset()


def test_compiled_training_stays_within_the_recompile_limit(tmp_path, _cheap_compile, caplog):
    """A compiled bf16 run with evaluation, sampling and a backprop_loops prefix, then an
    fp32 run in the same process: the block needs more variants than dynamo's default
    limit of 8 (grad modes, the first loop after the prefix, autocast), and every one is
    compiled: no frame falls back to eager and nothing warns."""
    counters = _cheap_compile
    for dtype in ("bfloat16", "float32"):
        cfg = _four_step_config(tmp_path / dtype, dtype=dtype, compile=True, backprop_loops=2,
                                sample_every=2, loop_sampling="fixed", model={**MODEL,
                                "n_loops": 4, "loss_loops": "all"})
        train(cfg, data=SyntheticData(), tokenizer=FakeTokenizer())
    assert counters["stats"]["unique_graphs"] > 8  # would have hit the default limit
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k]
    assert "recompile limit" not in caplog.text


def test_hitting_the_recompile_limit_is_a_warning(tmp_path, _cheap_compile, caplog,
                                                  monkeypatch):
    monkeypatch.setattr("loopedlm.train.parallel.BLOCK_RECOMPILE_LIMIT", 2)
    cfg = _four_step_config(tmp_path / "run", compile=True, backprop_loops=2, steps=2,
                            model={**MODEL, "n_loops": 4})
    with caplog.at_level("WARNING"):
        train(cfg, data=SyntheticData(), tokenizer=FakeTokenizer())
    assert "torch.compile reached its recompile limit during training" in caplog.text
    assert "runs eagerly" in caplog.text
