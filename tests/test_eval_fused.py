"""Evaluation through the fused head (issue 16): same BPB as the logits, the last loop
whatever `loss_loops` says, and no noise in the output of `loopedlm eval --tasks none`."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_

from loopedlm import LoopedGPT, ModelConfig
from loopedlm.evaluate.bpb import evaluate_bpb
from loopedlm.evaluate.budget import evaluate_budget, markdown_table, plot_budget


@pytest.mark.parametrize("loss_loops", ["last", "all"])
def test_bpb_is_the_last_loops_whatever_loss_loops(loss_loops):
    cfg = ModelConfig(depth=2, d_model=32, n_head=2, vocab_size=90, sequence_len=12,
                      n_loops=3, loss_loops=loss_loops)
    model = randomize_(LoopedGPT.from_config(cfg, seed=0)).eval()
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 90, (2, 12), generator=g)
    targets = torch.randint(0, 90, (2, 12), generator=g)
    targets[0, :3] = -1
    token_bytes = torch.randint(0, 4, (90,), generator=g)  # some special (0-byte) tokens
    got = evaluate_bpb(model, [(inputs, targets)] * 2, token_bytes, n_loops=2)
    with torch.no_grad():
        logits = model(inputs, n_loops=2)  # the last of 2 loops
    flat = targets.flatten()
    keep = (flat >= 0) & (token_bytes[flat.clamp(min=0)] > 0)
    losses = F.cross_entropy(logits.flatten(0, 1), flat.clamp(min=0), reduction="none")
    nats, n_bytes = 2 * float(losses[keep].sum()), 2 * float(token_bytes[flat[keep]].sum())
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert got["tokens"] == 2 * int(keep.sum()) and got["batches"] == 2


def test_tasks_none_lists_no_missing_core_task():
    cfg = ModelConfig(depth=1, d_model=32, n_head=1, vocab_size=64, sequence_len=8)
    model = LoopedGPT.from_config(cfg, seed=0)
    results = evaluate_budget(model, None, [1, 2], tasks=[])
    assert results["core_missing"] == []
    assert "not evaluated" not in markdown_table(results)


def test_plot_keeps_matplotlib_info_out_of_the_output(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # as the CLI does
    logging.getLogger("matplotlib").setLevel(logging.NOTSET)
    assert logging.getLogger("matplotlib").getEffectiveLevel() == logging.INFO
    results = {"loops": [1, 2], "metrics": {"val_bpb": {"1": 2.0, "2": 1.5}}}
    plot_budget(results, tmp_path / "budget.png")
    assert logging.getLogger("matplotlib").getEffectiveLevel() >= logging.WARNING
    assert (tmp_path / "budget.png").stat().st_size > 0
