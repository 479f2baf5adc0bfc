"""Diagnostics (docs/design.md#diagnostics): collapse detection on synthetic loss curves, gradient norms,
bits-per-byte, MFU."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from loopedlm.train.collapse import CollapseDetector, CollapseThresholds, replay_log
from loopedlm.train.metrics import evaluate_bpb, grad_norms, mfu, peak_flops, watched_parameters
from loopedlm.train.run_log import read_log


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
    assert float(norms["first_mlp"]) == pytest.approx(float(manual), rel=1e-5)
    assert float(norms["lm_head"]) == pytest.approx(float(model.lm_head.weight.grad.norm()),
                                                    rel=1e-5)


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


# ---- residual-state rules: the paper's collapse (loss stalls, state keeps growing) ----
FIXTURES = Path(__file__).parent / "fixtures"


def run_with_state(curve: list[float], norms: list[float], **thresholds) -> CollapseDetector:
    detector = CollapseDetector(CollapseThresholds(**thresholds))
    for step, (loss, norm) in enumerate(zip(curve, norms, strict=True), start=1):
        detector.update(step, loss, [norm / 2, norm])  # the maximum over loops is watched
    return detector


def test_lt_fixture_collapse_is_flagged_with_step_and_reason():
    """The paper's LT collapse (127M, N=12, H100): loss stuck at 6.3-7.0 from step 50,
    first-loop residual norm 1 -> ~3,600. The loss rules alone miss it."""
    records = read_log(FIXTURES / "small-lt-n12-log.jsonl.gz")
    thresholds = CollapseThresholds()
    detector = replay_log(records)
    assert detector.status() == "flagged"
    first = detector.events[0]
    assert first.kind == "stalled_growth"
    # it cannot fire before a full window after the warm-in, and it must catch the collapse
    # early, not at the end of a 1,350-step run
    assert thresholds.min_steps + thresholds.state_window <= first.step <= 400
    assert "residual-state norm grew" in first.detail and "loss stalled" in first.detail
    assert "state_explosion" in {e.kind for e in detector.events}
    assert all(e.step >= first.step for e in detector.events)
    without_norms = [{k: v for k, v in r.items() if k != "residual_norm"} for r in records]
    assert replay_log(without_norms).status() == "ok"  # what the old detector saw


def test_flt_fixture_is_not_flagged():
    """FLT on the same data trains (loss 2.9) while its norm grows to ~80: no flag."""
    detector = replay_log(FIXTURES / "small-flt-n12-log.jsonl.gz")
    assert detector.status() == "ok", detector.events


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 0.03),
       growth=st.floats(1.0, 2.0), power=st.floats(0.0, 2.0))
def test_learning_runs_with_growing_state_are_not_flagged(seed, noise, growth, power):
    """A run that learns may grow its state (polynomially, or by up to 2x over 600 steps
    after the descent) without a flag: the state rules need a stalled loss."""
    curve = healthy(600, seed, noise)
    norms = [(1 + i) ** (power / 4) * growth ** (i / 600) for i in range(600)]
    assert run_with_state(curve, norms).status() == "ok"


def test_converged_run_with_flat_state_is_not_flagged():
    curve = [3.0 + 0.01 * math.sin(i) for i in range(600)]
    assert run_with_state(curve, [5.0 + 0.1 * math.sin(i) for i in range(600)]).status() == "ok"


def test_stalled_loss_with_growing_state_is_flagged():
    rng = random.Random(0)
    curve = [6.8 * (1 + rng.gauss(0, 0.03)) for _ in range(600)]
    norms = [10 * 1.01 ** i for i in range(600)]  # 7.3x per 200 steps
    detector = run_with_state(curve, norms)
    kinds = [e.kind for e in detector.events]
    assert kinds[0] == "stalled_growth" and detector.events[0].step == 250
    assert detector.status() == "flagged"
    # the same curve learning instead of stalling is fine
    learning = [6.8 * math.exp(-i / 300) for i in range(600)]
    assert run_with_state(learning, norms).status() == "ok"


def test_slow_growth_far_beyond_early_level_is_flagged():
    """1.8x per window never trips stalled_growth, but it adds up to 100x."""
    curve = [6.8 + 0.02 * math.sin(i) for i in range(2000)]
    norms = [10 * 1.8 ** (i / 200) for i in range(2000)]
    detector = run_with_state(curve, norms)
    assert [e.kind for e in detector.events][:1] == ["state_explosion"]
    assert "stalled_growth" not in {e.kind for e in detector.events}
    early = statistics.median(norms[50:100])
    first = detector.events[0].step
    # the first step at which the median of the last 50 norms is 100x the early level
    assert statistics.median(norms[first - 50:first]) >= 100 * early
    assert statistics.median(norms[first - 51:first - 1]) < 100 * early
    assert run_with_state(curve, norms, state_ratio=math.inf).status() == "ok"


def test_nonfinite_residual_norm_is_flagged():
    detector = CollapseDetector()
    detector.update(1, 5.0, [1.0, math.inf])
    assert detector.events[0].kind == "state_explosion" and "loop 2" in detector.events[0].detail


def test_state_rules_round_trip_gives_same_events():
    rng = random.Random(2)
    curve = healthy(300, 0) + [6.8 * (1 + rng.gauss(0, 0.03)) for _ in range(500)]
    norms = [2.0 + i / 100 for i in range(300)] + [5 * 1.012 ** i for i in range(500)]
    whole = run_with_state(curve, norms)
    assert whole.events
    for cut in (60, 80, 420):  # before, at and after the early level is fixed
        first = run_with_state(curve[:cut], norms[:cut])
        second = CollapseDetector(CollapseThresholds())
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint
        for step, (loss, norm) in enumerate(zip(curve[cut:], norms[cut:], strict=True),
                                            start=cut + 1):
            second.update(step, loss, [norm / 2, norm])
        assert [e.to_dict() for e in second.events] == [e.to_dict() for e in whole.events]


def test_old_checkpoint_state_without_residual_rules_loads():
    old = CollapseDetector()
    for step, loss in enumerate(healthy(80, 0), start=1):
        old.update(step, loss)
    state = old.state_dict()
    del state["state"], state["early_norm"]
    fresh = CollapseDetector()
    fresh.load_state_dict(state)
    assert fresh.update(81, 3.5, [1.0]) == []


@pytest.mark.parametrize("field,value,allowed", [
    ("state_window", 3, "an integer >= 4"), ("state_window", 10.0, "an integer >= 4"),
    ("state_growth", 0.5, "a number >= 1"), ("state_ratio", math.nan, "a number >= 1"),
    ("stall_improvement", -0.1, "a number >= 0"), ("state_growth", True, "a number >= 1"),
])
def test_bad_thresholds_name_field_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=f"collapse.{field}=.*{allowed}"):
        CollapseThresholds(**{field: value})


def test_thresholds_from_the_command_line():
    from loopedlm.train.config import build_config, parse_train_args

    recipe, overrides = parse_train_args(["--collapse.state_window=40",
                                         "--collapse.state_growth=inf"])
    cfg = build_config(recipe, overrides)
    assert cfg.collapse.state_window == 40 and cfg.collapse.state_growth == math.inf


def test_read_log_accepts_a_gzipped_file_and_a_run_folder(tmp_path):
    records = read_log(FIXTURES / "small-flt-n12-log.jsonl.gz")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:5]))
    assert read_log(tmp_path) == records[:5] == read_log(tmp_path / "log.jsonl")


def test_short_real_training_run_is_not_flagged(tmp_path):
    """A real LT run that trains normally, with the windows shortened to fit 48 steps so
    that every rule is live (the state rules from step 36 on), raises no flag. (On this toy
    corpus the loss has converged by then while the state still grows slowly.)"""
    from train_helpers import make_corpus, small_config

    from loopedlm.train.trainer import train

    data_dir, tok_dir = make_corpus(tmp_path / "corpus")
    thresholds = CollapseThresholds(min_steps=20, plateau_window=16, swing_window=10,
                                    state_window=16)
    model = {"depth": 2, "d_model": 32, "n_head": 2, "sequence_len": 32, "n_loops": 3,
             "loop_mode": "lt"}
    summary = train(small_config(tmp_path / "run", data_dir, tok_dir, steps=48, eval_every=0,
                                 save_every=0, model=model, collapse=thresholds))
    assert summary["status"] == "completed"
    records = read_log(tmp_path / "run")
    curve = [r["loss"] for r in records if "loss" in r]
    assert len(curve) == 48 and curve[-1] < curve[0] - 1  # it did learn
    assert summary["collapse"]["status"] == "ok", summary["collapse"]["events"]
    assert replay_log(records, thresholds).status() == "ok"


def test_run_logger_writes_a_record_with_collapse_flags(tmp_path):
    """Regression: TensorBoard got each collapse flag (a dict) as a scalar and raised, so
    the first flag of a live run crashed it."""
    from loopedlm.train.run_log import RunLogger

    logger = RunLogger(tmp_path)
    flag = {"step": 3, "kind": "spike", "detail": "x"}
    logger.write({"step": 3, "loss": 2.0, "residual_norm": [1.0, 2.0], "collapse_flags": [flag]})
    logger.close()
    assert read_log(tmp_path)[0]["collapse_flags"] == [flag]


def test_plot_marks_the_flagged_steps(tmp_path):
    """`loopedlm plot` finds the LT fixture's flags by replaying its log (none were logged)
    and draws one marker per flag on each figure."""
    from loopedlm.experiments.plot import collapse_events, plot_runs

    lt = FIXTURES / "small-lt-n12-log.jsonl.gz"
    events = collapse_events(lt)
    assert events == [e.to_dict() for e in replay_log(lt).events] and events
    assert collapse_events(FIXTURES / "small-flt-n12-log.jsonl.gz") == []
    import matplotlib.axes

    marked = []
    original = matplotlib.axes.Axes.axvline

    def spy(self, x=0, *args, **kwargs):
        marked.append(x)
        return original(self, x, *args, **kwargs)

    matplotlib.axes.Axes.axvline = spy
    try:
        pngs = plot_runs([lt], tmp_path)
    finally:
        matplotlib.axes.Axes.axvline = original
    assert all(p.stat().st_size > 1000 for p in pngs)
    # loss + bpb, residual norm, four gradient panels: 7 axes, each marks every flag
    assert sorted(marked) == sorted([e["step"] for e in events] * 7)


def test_plot_command_lists_the_flags_beside_the_figures(tmp_path, capsys):
    """`loopedlm plot RUN` draws into RUN/plots (beside the log for a log file), prints each
    figure's path and then every collapse flag; `plot_runs` itself prints nothing."""
    import gzip

    from loopedlm.cli import main
    from loopedlm.experiments.plot import collapse_events, plot_runs

    run = tmp_path / "lt"
    run.mkdir()
    (run / "log.jsonl").write_bytes(gzip.decompress(
        (FIXTURES / "small-lt-n12-log.jsonl.gz").read_bytes()))
    events = collapse_events(run)
    assert events
    assert main(["plot", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = [run / "plots" / name for name in ("loss.png", "residual_norm.png", "grad_norm.png")]
    assert lines == [str(p) for p in figures] + [
        f"{run}: collapse flag '{e['kind']}' at step {e['step']}: {e['detail']}" for e in events]
    assert all(p.stat().st_size > 1000 for p in figures)

    log_file = tmp_path / "logs" / "flt.jsonl.gz"
    log_file.parent.mkdir()
    log_file.write_bytes((FIXTURES / "small-flt-n12-log.jsonl.gz").read_bytes())
    assert main(["plot", str(log_file)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / "logs" / "plots" / name)
        for name in ("loss.png", "residual_norm.png", "grad_norm.png")]
    plot_runs([log_file], tmp_path / "again")
    assert capsys.readouterr().out == ""
