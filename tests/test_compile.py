"""Regional compilation (`LoopedGPT.compile_blocks`): the block is compiled once, with no
graph breaks forward or backward, and the loop count never triggers a recompile."""

import pytest
import torch
from conftest import tiny_model
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from loopedlm.infer import DecodeEngine
from loopedlm.model.gpt import norm


class CountingBackend:
    """A dynamo backend that records every forward and backward graph it compiles."""

    def __init__(self):
        self.forward_graphs, self.backward_graphs = 0, 0

        def fw(gm, example_inputs):
            self.forward_graphs += 1
            return make_boxed_func(gm.forward)

        def bw(gm, example_inputs):
            self.backward_graphs += 1
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=fw, bw_compiler=bw)


def train_step(model, n_loops):
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.sequence_len),
                        generator=torch.Generator().manual_seed(n_loops))
    loss = model(idx, idx, n_loops=n_loops)
    loss.backward()
    return loss


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", [pytest.param("flt", marks=pytest.mark.slow), "lt"])
def test_block_compiles_once_whatever_the_loop_count(mode):
    """N=1 compiles every graph the block needs; N=2 and N=6 reuse them."""
    model = tiny_model(loop_mode=mode, loss_loops="all").train()
    counting = CountingBackend()
    model.compile_blocks(backend=counting.backend, fullgraph=True)  # fullgraph: no breaks
    train_step(model, 1)
    after_one = (counting.forward_graphs, counting.backward_graphs)
    # flt: the first layer (precomputed keys/values) and the others; lt: one for all
    assert after_one == ((2, 2) if mode == "flt" else (1, 1))
    train_step(model, 2)
    train_step(model, 6)
    after_two = (counting.forward_graphs, counting.backward_graphs)
    assert after_two == after_one
    # decoding with a KV cache runs the blocks eagerly: no graph per loop index
    engine = DecodeEngine(model, max_batch=1, max_loops=3)
    engine.add(0, [0, 0, 0, 0])
    engine.step()
    assert (counting.forward_graphs, counting.backward_graphs) == after_two
    assert not counters["graph_break"]


def test_block_has_no_graph_breaks_under_explain():
    model = tiny_model(loop_mode="flt")
    block = model.transformer.h[1]
    inputs = model.prepare(torch.randint(0, 61, (2, 24)))
    x = inputs.embedded
    for query in (None, norm(x + 1)):  # loop 1, and a later loop with a query source
        explanation = torch._dynamo.explain(block)(x, query, inputs.plan, 3, 1.0)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_keys():
    eager = tiny_model(loop_mode="flt").train()
    compiled = tiny_model(loop_mode="flt").train().compile_blocks(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(train_step(compiled, 3), train_step(eager, 3))
    for a, b in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
