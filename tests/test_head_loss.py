"""The fused, chunked LM-head loss equals the plain logits + cross-entropy path, eager and
with its chunk body compiled; cut-cross-entropy runs only when asked for."""

import contextlib
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from loopedlm.model.gpt import norm
from loopedlm.model.head_loss import check_head_backend, chunk_rows_for, head_loss


def plain_loss(h, weight, targets, softcap=15.0):
    """The path head_loss replaces: full logits, soft-cap in fp32, cross-entropy."""
    logits = (h @ weight.T).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1)


def loss_and_grads(fn, h, weight, targets):
    loss = fn(h, weight, targets)
    return (loss, *torch.autograd.grad(loss, [h, weight]))


def make_inputs(rows=150, d=16, vocab=200, seed=0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * 2).requires_grad_()  # reaches the cap
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::ignore_every] = -1
    return h, weight, targets


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def _aot_eager(_fresh_dynamo):
    """Compiled through AOT autograd without inductor's code generation: the same graphs,
    shapes and padding in seconds (the slow tier checks inductor itself)."""
    with torch.compiler.set_stance("default", force_backend="aot_eager"):
        yield


INDUCTOR = pytest.param(7, True, marks=pytest.mark.slow, id="7-inductor")


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("chunk_rows, compile", [(1, False), (7, False), (64, False),
                                                 (150, False), (1000, False), (7, "aot"),
                                                 (150, "aot"), INDUCTOR])
def test_loss_and_gradients_match_plain_path(chunk_rows, compile):
    """7 rows per chunk leaves a short last chunk (150 = 21 x 7 + 3): compiled, it is
    padded with ignored rows to keep one static shape."""
    h, weight, targets = make_inputs()
    expected = loss_and_grads(plain_loss, h, weight, targets)
    stance = (torch.compiler.set_stance("default", force_backend="aot_eager")
              if compile == "aot" else contextlib.nullcontext())
    with stance:
        got = loss_and_grads(lambda *a: head_loss(*a, 15.0, chunk_elements=chunk_rows * 200,
                                                  compile=bool(compile)), h, weight, targets)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_batched_rows_and_other_softcap():
    h, weight, targets = make_inputs(rows=48)
    h3, t3 = h.detach().view(3, 16, -1).requires_grad_(), targets.view(3, 16)
    expected = loss_and_grads(lambda a, w, t: plain_loss(a, w, t, 4.0), h3, weight, t3)
    got = loss_and_grads(lambda a, w, t: head_loss(a, w, t, 4.0, chunk_elements=2000),
                         h3, weight, t3)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_plain_path_to_bf16_rounding():
    h, weight, targets = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(plain_loss, h, weight, targets)
        got = loss_and_grads(lambda *a: head_loss(*a, 15.0, chunk_elements=4000),
                             h, weight, targets)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    for g, e in zip(got[1:], expected[1:], strict=True):
        assert g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


def test_every_target_ignored_gives_nan_like_cross_entropy():
    h, weight, targets = make_inputs(rows=8)
    targets[:] = -1
    assert plain_loss(h, weight, targets).isnan() and head_loss(h, weight, targets, 15.0).isnan()


def test_chunk_rows_and_bad_backend():
    assert chunk_rows_for(151_669, 2**25) == 221 and chunk_rows_for(10**9) == 1
    h, weight, targets = make_inputs(rows=4)
    with pytest.raises(ValueError, match="backend 'bogus' is not allowed.*chunked"):
        head_loss(h, weight, targets, 15.0, backend="bogus")


def test_cut_cross_entropy_is_opt_in_and_fails_loudly(monkeypatch):
    """Nothing picks cut-cross-entropy by itself; asked for where it cannot run, it says
    why in one line, naming the import error rather than falling back in silence."""
    assert head_loss.__kwdefaults__["backend"] == "chunked"
    with pytest.raises(ValueError, match="CUDA only, not on cpu"):
        check_head_backend("cce", "cpu")
    # a broken install (here: an import that raises, as a failing triton autotuner would)
    monkeypatch.setitem(__import__("sys").modules, "cut_cross_entropy", None)
    with pytest.raises(ValueError, match="cut-cross-entropy.*failed to import"):
        check_head_backend("cce")


def plain_model_loss(model, idx, targets, n_loops):
    """Every supervised loop through logits() + F.cross_entropy, via the per-loop API."""
    inputs, previous, losses = model.prepare(idx), None, []
    for loop in range(n_loops):
        previous = norm(model.loop(inputs, previous, loop))
        if loop in model.supervised_loops(n_loops):
            losses.append(F.cross_entropy(model.logits(previous).flatten(0, 1),
                                          targets.flatten(), ignore_index=-1))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("loss_loops", ["last", "all", "last_third"])
@pytest.mark.parametrize("mode", ["lt", "flt"])
def test_model_loss_and_gradients_match_plain_path(mode, loss_loops):
    model = tiny_model(loop_mode=mode, n_loops=4, loss_loops=loss_loops).train()
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 61, (2, 24), generator=gen)
    targets = torch.randint(0, 61, (2, 24), generator=gen)
    targets[0, ::3] = -1
    params = list(model.parameters())
    got = model(idx, targets)
    got_grads = torch.autograd.grad(got, params)
    expected = plain_model_loss(model, idx, targets, 4)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # the padded vocabulary rows of the head get exactly zero gradient, as before
    assert model.config.padded_vocab_size > model.config.vocab_size
    assert got_grads[-1][model.config.vocab_size:].abs().max() == 0


@pytest.mark.parametrize("chunk_rows", [7, 150])  # recomputed, and kept single chunk
def test_backward_twice_with_retained_graph(chunk_rows):
    h, weight, targets = make_inputs()
    loss = head_loss(h, weight, targets, 15.0, chunk_elements=chunk_rows * 200)
    first = torch.autograd.grad(loss, [h, weight], retain_graph=True)
    second = torch.autograd.grad(loss, [h, weight])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.usefixtures("_fresh_dynamo")
def test_compiled_chunks_under_bf16_autocast_match_eager():
    """Inductor's code for the chunk body under bf16 autocast."""
    h, weight, targets = make_inputs(rows=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = loss_and_grads(lambda *a: head_loss(*a, 15.0, chunk_elements=9 * 200),
                               h, weight, targets)
        compiled = loss_and_grads(lambda *a: head_loss(*a, 15.0, chunk_elements=9 * 200,
                                                       compile=True), h, weight, targets)
    for g, e in zip(compiled, eager, strict=True):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-2 * e.abs().max().item())


@pytest.mark.usefixtures("_aot_eager")
def test_model_head_options_compile_the_chunk_body(caplog):
    """`LoopedGPT.head_options` reaches the head; compiled, the loss and gradients are the
    eager ones, and no recompile limit is hit over training, no-grad and eval calls."""
    model = tiny_model(loop_mode="flt", n_loops=3, loss_loops="all").train()
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    eager = model(idx, idx)
    eager_grads = torch.autograd.grad(eager, params)
    model.head_options = {"compile": True}
    with caplog.at_level(logging.WARNING):
        got = model(idx, idx)
        got_grads = torch.autograd.grad(got, params)
        with torch.no_grad():
            model(idx[:1], idx[:1])
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for g, e in zip(got_grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert "recompile" not in caplog.text
