"""The per-loop view of generated tokens (issue 28): `loopedlm.infer.trace`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from loopedlm.infer.generate import generate
from loopedlm.infer.trace import format_trace, trace_loops


def test_trace_is_each_loops_distribution_of_each_generated_token():
    model = tiny_model(n_loops=3)
    prompt = [0, 5, 9, 14]
    generated = generate(model, [prompt], max_tokens=5, temperature=0).tokens[0]
    trace = trace_loops(model, prompt, generated, n_loops=4, top_k=3)
    assert [entry["token"] for entry in trace] == generated
    ids = torch.tensor([prompt + generated[:-1]])
    for t in range(1, 5):
        probs = torch.softmax(model(ids, n_loops=t)[0, len(prompt) - 1:].float(), -1)
        for k, entry in enumerate(trace):
            step = entry["loops"][t - 1]
            top_p, top_ids = probs[k].topk(3)
            assert [i for i, _ in step["top"]] == top_ids.tolist()
            assert [p for _, p in step["top"]] == pytest.approx(top_p.tolist(), abs=1e-5)
            assert step["p"] == pytest.approx(probs[k, generated[k]].item(), abs=1e-5)
            entropy = -(probs[k] * probs[k].clamp_min(1e-30).log()).sum().item()
            assert step["entropy"] == pytest.approx(entropy, abs=1e-4)
            assert 0 <= step["entropy"] <= math.log(61) + 1e-4


def test_greedy_tokens_are_the_last_loops_top_token():
    model = tiny_model(n_loops=3)
    generated = generate(model, [[0, 3, 4]], max_tokens=6, temperature=0).tokens[0]
    trace = trace_loops(model, [0, 3, 4], generated)
    assert all(len(e["loops"]) == 3 for e in trace)  # the model's loop count by default
    assert [e["loops"][-1]["top"][0][0] for e in trace] == generated


def test_trace_bad_inputs_and_text():
    model = tiny_model(n_loops=2)
    with pytest.raises(ValueError, match="prompt is empty"):
        trace_loops(model, [], [1])
    with pytest.raises(ValueError, match="top_k=0 is not allowed"):
        trace_loops(model, [0], [1], top_k=0)
    with pytest.raises(ValueError, match="longer than the context"):
        trace_loops(model, [0] * 20, [1] * 10)
    assert trace_loops(model, [0], []) == []

    class Words:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    text = format_trace(trace_loops(model, [0, 1], [7, 8]), Words())
    assert text.splitlines()[0] == "token 1: 'w7'"
    assert sum(line.startswith("  loop ") for line in text.splitlines()) == 4
