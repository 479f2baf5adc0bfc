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
