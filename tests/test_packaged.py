"""Decode steps packaged by AOTInductor (loopedlm.infer.packaged): built by the warming
process on random weights, loaded by compile="auto" on a CPU from a run's first step,
bound to the engine's own weights, and giving the eager engine's tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from loopedlm.infer import DecodeEngine, SamplingParams, SequenceParams, packaged, warm
from loopedlm.infer.engine import StepKey, build_package

N_LOOPS, MAX_LEN = 3, 24
GREEDY = SamplingParams(temperature=0)


def make_model(std: float = 0.1, seed: int = 0, **overrides):
    return tiny_model(seed=seed, std=std, loop_mode="flt", **overrides)


def prompt(seed: int, length: int, vocab: int = 61) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def seq(prompt_ids: list[int], **params) -> dict:
    return dict(prompt_ids=prompt_ids, params=SequenceParams(**params))
VARIANT = StepKey(1, N_LOOPS, 0, False, False, True)


def engine_of(model, **kw) -> DecodeEngine:
    return DecodeEngine(model, max_batch=1, max_len=MAX_LEN, max_loops=N_LOOPS, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One package, built as an engine has it built: by the warming process (a separate
    process, from the spec alone: the model's shape, random weights), under a temporary
    LOOPEDLM_HOME. (home, spec)."""
    home = tmp_path_factory.mktemp("home")
    env_home = {"LOOPEDLM_HOME": str(home), "TORCHINDUCTOR_CACHE_DIR": str(home / "torch_compile")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env_home.items():
            patch.setenv(name, value)
        spec = engine_of(make_model(seed=5)).package_spec(VARIANT)
        lock = warm.markers_dir() / "test.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
        code = "import sys; from loopedlm.infer.engine import warm_main; sys.exit(warm_main())"
        env = {**os.environ, **env_home,
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([sys.executable, "-c", code, str(lock)], input=spec.to_json(),
                              text=True, env=env, capture_output=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert not lock.exists()
        assert warm.package_state(spec) == "ready"
    return home, spec


@pytest.fixture
def home(built, monkeypatch):
    monkeypatch.setenv("LOOPEDLM_HOME", str(built[0]))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(built[0] / "torch_compile"))
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    return built[0]


def decode(engine: DecodeEngine, ids: list[int], steps: int) -> list[int]:
    tokens = [int(engine.add(0, **seq(ids, n_loops=N_LOOPS, sampling=GREEDY)))]
    for _ in range(steps):
        tokens.append(int(engine.step().tokens[0]))
    return tokens


@torch.no_grad()
def test_auto_runs_a_built_package_from_the_first_step_with_the_eager_tokens(home, monkeypatch):
    """compile="auto" on a CPU loads the package at a variant's first step and runs it,
    bound to this engine's weights (not the random ones it was built on), to the end of the
    cache (the last steps, attending over every position, run without it); the tokens are
    the eager engine's."""
    runs = []
    real_run = packaged.StepPackage.run
    monkeypatch.setattr(packaged.StepPackage, "run",
                        lambda self, *a: runs.append(1) or real_run(self, *a))
    model = make_model(std=0.3)
    ids = prompt(1, 5)
    steps = MAX_LEN - len(ids)
    eager = decode(engine_of(model, compile=False), ids, steps)
    auto = engine_of(model)
    assert decode(auto, ids, steps) == eager
    assert len(runs) >= steps - 2  # every step but those over all MAX_LEN positions
    # the weights change in place (a training step): the package decodes with the new ones
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    auto.reset()
    eager = decode(engine_of(model, compile=False), ids, steps)
    assert decode(auto, ids, steps) == eager


@torch.no_grad()
def test_packages_no_run_used_for_30_days_are_pruned_and_a_loaded_one_is_kept(home, built):
    """The warming process deletes the packages, markers and logs that nothing built, wrote
    or loaded for 30 days (each change to loopedlm's source makes a new set); loading a
    package marks it used. Locks and the files of a variant used recently stay."""
    path = warm.package_path(built[1])
    month = 31 * 24 * 3600
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime - month))
    marker = path.with_suffix(".json")
    os.utime(marker, (marker.stat().st_atime, marker.stat().st_mtime - month))
    engine = engine_of(make_model(std=0.3))
    decode(engine, prompt(1, 5), 2)  # loads the package: used now
    assert engine.packaged_steps == 1 and time.time() - path.stat().st_mtime < 600
    folder, old = warm.markers_dir(), time.time() - month
    stale = [folder / f"{'a' * 32}{suffix}" for suffix in (".pt2", ".json", ".log")]
    recent = [folder / f"{'b' * 32}.pt2", folder / f"{'b' * 32}.json"]
    lock = folder / f"{'c' * 32}.lock"
    for file in [*stale, *recent, lock]:
        file.write_text("x")
    for file in [*stale, recent[0], lock]:
        os.utime(file, (old, old))
    assert warm.prune() == 3
    assert not any(file.exists() for file in stale)
    assert all(file.exists() for file in [*recent, lock, path, marker])
    for file in [*recent, lock]:
        file.unlink()


@torch.no_grad()
def test_a_package_is_not_used_where_the_shapes_differ(home, monkeypatch):
    """A package is for its inputs' exact shapes: a wider stop-id table or another cache
    length runs without it (and asks for its own), with the eager tokens."""
    runs = []
    monkeypatch.setattr(packaged.StepPackage, "run", lambda self, *a: runs.append(1))
    model = make_model(std=0.3)
    ids = prompt(2, 4)
    engine = engine_of(model)
    params = dict(n_loops=N_LOOPS, sampling=GREEDY, stop_ids=[59, 60])
    engine.add(0, ids, SequenceParams(**params))
    engine.step()
    other = DecodeEngine(model, max_batch=1, max_len=MAX_LEN - 1, max_loops=N_LOOPS)
    assert decode(other, ids, 3) == decode(engine_of(model, compile=False), ids, 3)
    assert runs == []


def test_a_package_build_that_fails_is_marked_so_and_not_asked_again(home):
    spec = engine_of(make_model()).package_spec(VARIANT)
    broken = replace(spec, shapes=[[1]])
    engine = engine_of(make_model())
    assert build_package(engine, broken) == 1
    assert warm.package_state(broken) == "failed"
    assert warm.package_state(spec) == "ready"


def test_the_slot_state_is_tensors_of_their_own():
    """A package takes the slot state's tensors as inputs: none may be a view of another."""
    engine = engine_of(make_model())
    names = [name for name, _ in packaged.state_tensors(engine)]
    assert "stop_table" in names and "tokens" in names
    assert len(packaged.step_inputs(engine)) == 2 * len(engine.cache.stores) + len(names)


@torch.no_grad()
def test_generate_sizes_its_caches_in_steps_so_that_prompts_of_other_lengths_share_a_package(
        monkeypatch):
    """A package is built for its cache length: generate() rounds that length up (to
    CACHE_LEN_STEP, at most the context), so prompts of other lengths share one."""
    from loopedlm.infer import generate as generate_module

    lengths = []
    real = generate_module.DecodeEngine

    def spy(*args, **kw):
        lengths.append(kw["max_len"])
        return real(*args, **kw)

    monkeypatch.setattr(generate_module, "DecodeEngine", spy)
    model = make_model(sequence_len=64)
    for length in (3, 9):
        generate_module.generate(model, prompt(length, length), max_tokens=4, n_loops=2,
                                 temperature=0)
    step = min(generate_module.CACHE_LEN_STEP, 64)
    assert lengths == [step, step]


@torch.no_grad()
def test_a_package_that_raises_is_dropped_and_the_step_runs_without_it(built, tmp_path,
                                                                       monkeypatch):
    """A package is only an optimisation: one that raises at run time is dropped (and marked
    failed, so no later run loads it) and the step runs as it would without it."""
    import shutil

    shutil.copytree(built[0], tmp_path / "home")
    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "home" / "torch_compile"))
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    calls = []

    def broken(self, *args):
        calls.append(1)
        raise RuntimeError("the package's kernels refused")

    monkeypatch.setattr(packaged.StepPackage, "run", broken)
    model = make_model(std=0.3)
    ids = prompt(3, 6)
    auto = engine_of(model)
    assert decode(auto, ids, 6) == decode(engine_of(model, compile=False), ids, 6)
    assert calls == [1] and auto.packaged_steps == 0
    assert warm.package_state(built[1]) == "failed"


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("mode,variant,rows", [
    # two rows: a seeded top-k/top-p row with logprobs beside a greedy one at fewer loops
    ("flt", "gqa", "mixed"),
    ("lt", "mla", "mixed"),
    ("ltai", "swa", "greedy"),
    ("flt_res", "mla_swa", "seeded"),
    ("flt", "mha", "speculative"),
])
def test_packages_of_every_kind_give_the_eager_tokens(tmp_path, monkeypatch, mode, variant,
                                                      rows):
    """Packages built (on another model's weights) for loop modes, attention variants and
    step variants beyond the default test's: mixed loop counts, seeded filtered sampling,
    logprobs. Each runs, and gives the eager engine's tokens and logprobs."""
    from conftest import VARIANTS

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_compile"))
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    seeded = SamplingParams(temperature=0.8, top_k=7, top_p=0.9, seed=4)
    requests = {
        "mixed": [dict(n_loops=3, sampling=seeded, logprobs=2), dict(n_loops=2, sampling=GREEDY)],
        "greedy": [dict(n_loops=3, sampling=GREEDY), dict(n_loops=3, sampling=GREEDY)],
        "seeded": [dict(n_loops=3, sampling=seeded)],
        # a speculative row beside a plain one: the step pops its verified tokens
        "speculative": [dict(n_loops=3, sampling=GREEDY, draft_loops=1, draft_tokens=3),
                        dict(n_loops=3, sampling=GREEDY)],
    }[rows]
    shape = {**VARIANTS[variant], "loop_mode": mode}

    def engine(seed, **kw):
        return DecodeEngine(tiny_model(seed=seed, std=0.3, **shape), max_batch=len(requests),
                            max_loops=N_LOOPS, **kw)

    def run(e, steps=6):
        out = []
        for slot, params in enumerate(requests):
            e.add(slot, prompt(slot + 7, 4), SequenceParams(**params))
        for _ in range(steps):
            step = e.step()
            out.append((step.tokens.tolist(), step.host_logprobs() if rows == "mixed" else None))
        return out

    # the variant the engine steps through, packaged on a model of another seed
    key = {"mixed": StepKey(2, N_LOOPS, 0, mixed=True, filtered=True, greedy=False,
                            logprobs=True),
           "greedy": StepKey(2, N_LOOPS, 0, mixed=False, filtered=False, greedy=True),
           "seeded": StepKey(1, N_LOOPS, 0, mixed=False, filtered=True, greedy=False),
           "speculative": StepKey(2, N_LOOPS, 0, mixed=False, filtered=False, greedy=True,
                                  speculative=True)}[rows]
    spec = engine(0).package_spec(key)
    assert build_package(engine(9, compile=False), spec) == 0
    runs = []
    real_run = packaged.StepPackage.run
    monkeypatch.setattr(packaged.StepPackage, "run",
                        lambda self, *a: runs.append(1) or real_run(self, *a))
    packaged_out, eager_out = run(engine(0)), run(engine(0, compile=False))
    assert [tokens for tokens, _ in packaged_out] == [tokens for tokens, _ in eager_out]
    for (_, mine), (_, theirs) in zip(packaged_out, eager_out, strict=True):
        if theirs is not None:
            flat = [(lp, *[x for pair in top for x in pair]) for lp, top in theirs]
            assert [(lp, *[x for pair in top for x in pair]) for lp, top in mine] == \
                [pytest.approx(row, abs=1e-5) for row in flat]
    assert runs  # the package ran


def test_a_package_is_named_for_the_cpu_it_was_built_on(monkeypatch):
    """A LOOPEDLM_HOME shared between machines must not hand an AVX-512 package to a CPU
    without AVX-512: the CPU's kind is part of a package's (and a marker's) name."""
    spec = engine_of(make_model()).package_spec(VARIANT)
    here = spec.signature()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_TEST")
    assert spec.signature() != here


def test_a_step_that_draws_random_numbers_is_not_packaged():
    """Huginn's random initial state is drawn from torch's global generator when decoding
    eagerly; a package would draw from its own: such a model is never packaged."""
    engine = DecodeEngine(tiny_model(std=0.3, state_init="random"), max_batch=1, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="random initial state"):
        engine.package_spec(VARIANT)


def adaptive_requests(thresholds=(0.5, 1.0), speculative: bool = True) -> list[SequenceParams]:
    """Rows of an adaptive step: adaptive rows of other thresholds and budgets (one with
    min_loops), a plain row, and a speculative row (which the step does not compute; with
    shared cache slots, which speculative decoding refuses, another plain row)."""
    from loopedlm.infer import AdaptiveLoops

    return [SequenceParams(n_loops=4, sampling=GREEDY,
                           adaptive=AdaptiveLoops(thresholds[0], "state")),
            SequenceParams(n_loops=3, sampling=GREEDY),
            SequenceParams(n_loops=4, sampling=GREEDY,
                           adaptive=AdaptiveLoops(thresholds[1], "state", min_loops=2)),
            SequenceParams(n_loops=4, sampling=GREEDY, draft_loops=1, draft_tokens=2)
            if speculative else SequenceParams(n_loops=2, sampling=GREEDY)]


def run_adaptive(engine: DecodeEngine, requests: list[SequenceParams], steps: int
                 ) -> list[tuple[list[int], list[int]]]:
    """(tokens, loops) of every step of `requests` decoded together from their own prompts."""
    for slot, params in enumerate(requests):
        engine.add(slot, prompt(slot + 11, 3 + slot), params)
    out = []
    for _ in range(steps):
        step = engine.step()
        out.append((step.tokens.tolist(), step.loops.tolist()))
    return out


@torch.no_grad()
def test_adaptive_steps_run_packaged_loops_with_the_eager_tokens_and_loop_counts(
        tmp_path, monkeypatch):
    """compile="auto" on a CPU runs an adaptive step by packaged loops (`adaptive_loop`: the
    first loop and a later one, built on another model's weights), every row of the batch
    in each loop, a row that stopped writing no keys, and ends it by its packaged coda
    (`adaptive_coda`: the skipped loops' fill, read-out, sampling, record): each row's
    tokens and loop counts are the eager step's, where stopped rows leave the batch, beside
    a plain and a speculative row, to the end of the cache."""
    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_compile"))
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    requests = adaptive_requests()

    def engine(seed, **kw):
        return DecodeEngine(make_model(std=0.3, seed=seed), max_batch=len(requests),
                            max_len=MAX_LEN, max_loops=4, **kw)

    keys = adaptive_keys(len(requests), speculative=True, fewer=(2,))
    for key in keys:
        assert build_package(engine(9, compile=False), engine(0).package_spec(key)) == 0
    coda, fewer = (warm.package_path(engine(0).package_spec(key)).name for key in keys[-1:1:-1])
    runs = []
    real_run = packaged.StepPackage.run
    monkeypatch.setattr(packaged.StepPackage, "run",
                        lambda self, *a: runs.append(self.path.name) or real_run(self, *a))
    steps = MAX_LEN - 3 - len(requests)
    eager = run_adaptive(engine(0, compile=False), requests, steps)
    assert runs == []
    auto = engine(0)
    assert run_adaptive(auto, requests, steps) == eager
    assert auto.packaged_steps == 4 and runs.count(coda) == steps and len(runs) >= 3 * steps
    assert runs.count(fewer) > 0  # the later loops of the 2 rows still looping, gathered
    # the adaptive rows stopped at every loop count they may: before their budget too
    assert {counts[0] for _, counts in eager} == {2, 3, 4}
    assert {counts[2] for _, counts in eager} == {2, 3, 4}
    # a package that raises mid-step (a loop's or the coda's): dropped (and marked failed),
    # the step rerun eagerly over the keys it wrote, the tokens unchanged
    runs.clear()
    failed = []

    def broken(self, *args):  # the coda's second run, then the third loop run after it
        runs.append(self.path.name)
        if self.path.name == coda and runs.count(coda) == 2 or \
                failed and len(runs) == runs.index(coda, runs.index(coda) + 1) + 4:
            failed.append(self.path.name)
            raise RuntimeError("the package's kernels refused")
        return real_run(self, *args)

    monkeypatch.setattr(packaged.StepPackage, "run", broken)
    auto.reset()
    assert run_adaptive(auto, requests, steps) == eager
    assert len(failed) == 2 and failed[0] == coda and failed[1] != coda
    assert auto.packaged_steps == 2
    assert [warm.package_state(auto.package_spec(key)) == "failed" for key in keys] == \
        [warm.package_path(auto.package_spec(key)).name in failed for key in keys]


def adaptive_keys(batch: int, speculative: bool, fewer: tuple[int, ...] = ()) -> list[StepKey]:
    """The packages of an adaptive step of greedy rows: its loops, later loops over `fewer`
    rows, then its coda."""
    return [StepKey(batch, 0, 0, False, False, False, loop_program=program)
            for program in ("first", "later")] + \
        [StepKey(batch, 0, 0, False, False, False, loop_program="later", rows=rows)
         for rows in fewer] + \
        [StepKey(batch, 0, 0, False, False, True, speculative, loop_program="coda")]


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("mode,variant,cache_slots", [
    ("lt", "mla", None),          # every loop writes layer 0 (no shared first layer)
    ("ltai", "swa", 2),           # loops share cache slots: a stopped row must write nothing
    ("flt_res", "mla_swa", None),
    ("flt", "gqa", 3),
])
def test_packaged_adaptive_loops_of_every_kind_give_the_eager_tokens(
        tmp_path, monkeypatch, mode, variant, cache_slots):
    """The packaged adaptive loops (later loops over fewer rows, gathered, too) for loop
    modes, attention variants and shared cache slots beyond the default test's: the eager
    step's tokens and loop counts."""
    from conftest import VARIANTS

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_compile"))
    monkeypatch.setenv(warm.WARMUP_ENV, "0")
    requests = adaptive_requests(speculative=cache_slots is None)
    shape = {**VARIANTS[variant], "loop_mode": mode}

    max_len = min(MAX_LEN, shape.get("sequence_len", MAX_LEN))

    def engine(seed, **kw):
        return DecodeEngine(tiny_model(seed=seed, std=0.3, **shape), max_batch=len(requests),
                            max_len=max_len, max_loops=4, cache_slots=cache_slots, **kw)

    for key in adaptive_keys(len(requests), speculative=cache_slots is None, fewer=(1, 2)):
        assert build_package(engine(9, compile=False), engine(0).package_spec(key)) == 0
    steps = max_len - 3 - len(requests)
    eager = run_adaptive(engine(0, compile=False), requests, steps)
    auto = engine(0)
    assert run_adaptive(auto, requests, steps) == eager
    assert auto.packaged_steps == 5
    # an adaptive row stopped before its budget
    assert min(min(counts[0], counts[2]) for _, counts in eager) < 4, eager


@torch.no_grad()
def test_an_adaptive_step_without_packages_has_the_warming_process_build_its_loops(
        tmp_path, monkeypatch):
    """Under compile="auto" on a CPU an adaptive variant that keeps running eagerly asks the
    warming process for its two loop programs and its coda (as a fixed step asks for its
    package); the specs travel as JSON and name the program."""
    from loopedlm.infer import engine as engine_module

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch_compile"))
    monkeypatch.setattr(engine_module, "AUTO_COMPILE_AFTER", 8)  # (the tests' default: never)
    asked = []
    monkeypatch.setattr(engine_module, "start_warming", lambda spec: asked.append(spec) or True)
    requests = adaptive_requests(speculative=False)
    engine = DecodeEngine(make_model(std=0.3, sequence_len=64), max_batch=len(requests),
                          max_len=64, max_loops=4)
    for slot, params in enumerate(requests):
        engine.add(slot, prompt(slot, 4), params)
    for _ in range(engine_module.AUTO_COMPILE_AFTER):
        engine.step()
    programs = [warm.WarmSpec.from_json(spec.to_json()) for spec in asked]
    assert sorted(StepKey(**spec.variant).loop_program for spec in programs) == \
        ["coda", "first", "later"]
    assert all(spec.package and spec.variant["batch"] == len(requests) for spec in programs)
    assert engine.packaged_steps == 0  # none built yet: the steps ran eagerly
