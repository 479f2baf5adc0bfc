"""The fused, chunked LM-head loss equals the plain logits + cross-entropy path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from loopedlm.model.gpt import norm
from loopedlm.model.head_loss import chunk_rows_for, head_loss


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


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 150, 1000])
def test_loss_and_gradients_match_plain_path(chunk_rows):
    h, weight, targets = make_inputs()
    expected = loss_and_grads(plain_loss, h, weight, targets)
    got = loss_and_grads(lambda *a: head_loss(*a, 15.0, chunk_elements=chunk_rows * 200),
                         h, weight, targets)
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
    with pytest.raises(ValueError, match="backend='bogus'"):
        head_loss(h, weight, targets, 15.0, backend="bogus")


def plain_model_loss(model, idx, targets, n_loops):
    """Every supervised loop through logits() + F.cross_entropy, via the per-loop API."""
    inputs, previous, losses = model.prepare(idx), None, []
    for loop in range(n_loops):
        previous = norm(model.loop(inputs, previous, loop))
        if loop in model.loss_loops(n_loops):
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
