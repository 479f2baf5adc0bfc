"""torchrun + DDP on CPU (gloo): 2 processes give the loss curve of 1 process with the same
global batch, with and without ZeRO-sharded AdamW state; rank 0 alone writes the run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from train_helpers import MODEL, FakeTokenizer, SyntheticData, losses, make_corpus

from loopedlm.model.checkpoint import latest_training_checkpoint, load_model
from loopedlm.train.config import TrainConfig
from loopedlm.train.trainer import train

TESTS = Path(__file__).resolve().parent


def _config(run: Path, device_batch_size: int, zero: bool) -> dict:
    return dict(run_dir=str(run), model=dict(MODEL), total_batch_tokens=512,
                device_batch_size=device_batch_size, steps=6, eval_every=3, eval_tokens=512,
                save_every=3, device="cpu", progress=False, sample_tokens=4, zero=zero)


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1 process: micro-batch 8 x 32 tokens, 2 accumulation steps = 512 tokens per step."""
    run = tmp_path_factory.mktemp("single") / "run"
    summary = train(TrainConfig(**_config(run, 8, False)), data=SyntheticData(),
                    tokenizer=FakeTokenizer())
    return run, summary


@pytest.mark.parametrize("zero", [False, True])
def test_two_ranks_match_one(tmp_path, single, zero):
    run = tmp_path / "run"
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from train_helpers import FakeTokenizer, SyntheticData
        from loopedlm.train.config import TrainConfig
        from loopedlm.train.trainer import train
        train(TrainConfig(**{_config(run, 8, zero)!r}), data=SyntheticData(),
              tokenizer=FakeTokenizer())
    """))
    _torchrun([str(script)], tmp_path)
    one, two = losses(single[0]), losses(run)
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:  # same global batch; only the summation order differs
        assert two[step] == pytest.approx(one[step], rel=1e-3, abs=1e-3), step
    assert losses(run)[6] < losses(run)[1]
    bpb_two = json.loads((run / "summary.json").read_text())["val_bpb"]
    assert bpb_two == pytest.approx(single[1]["val_bpb"], rel=1e-3)
    assert latest_training_checkpoint(run).name == "step_000006"
    assert len([x for x in (run / "log.jsonl").read_text().splitlines() if '"loss"' in x]) == 6


def test_cli_under_torchrun_on_parquet(tmp_path):
    data_dir, tok_dir = make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    done = _torchrun(["-m", "loopedlm.train", f"--run_dir={run}", f"--data_dir={data_dir}",
                      f"--tokenizer={tok_dir}", "--model.depth=2", "--model.d_model=32",
                      "--model.n_head=2", "--model.sequence_len=32", "--model.n_loops=2",
                      "--total_batch_tokens=256", "--device_batch_size=4", "--steps=3",
                      "--eval_every=0", "--eval_tokens=256", "--save_every=0", "--device=cpu",
                      "--progress=false", "--sample_tokens=4"], tmp_path)
    assert done.stdout.count("final validation bits-per-byte") == 1  # rank 0 only
    assert len([line for line in done.stderr.splitlines() if line.startswith("model:")]) == 1
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["grad_accum_steps"] == 1
    state = json.loads((latest_training_checkpoint(run) / "train_state.json").read_text())
    assert [s["rank"] for s in state["loader"]] == [0, 1]  # every rank's data position
    model, meta = load_model(run)
    assert meta["step"] == 3


SHARDED_ADAMW = """
import json, sys
import torch
import torch.distributed as dist
from loopedlm.train.optim import ShardedAdamW

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
shapes = [(10, 4), (7, 3)]  # rows not divisible by the 3 ranks
start = [torch.randn(s) for s in shapes]
mine = [torch.nn.Parameter(t.clone()) for t in start]
ref = [torch.nn.Parameter(t.clone()) for t in start]


def groups(params):
    return [{"params": [params[0]], "lr": 0.1, "initial_lr": 0.1, "name": "embedding"},
            {"params": [params[1]], "lr": 0.01, "initial_lr": 0.01, "name": "lm_head"}]


kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
sharded = ShardedAdamW(groups(mine), rank=rank, world_size=world, **kwargs)
plain = torch.optim.AdamW(groups(ref), **kwargs)


def step(seed):
    gen = torch.Generator().manual_seed(seed)  # the same gradients on every rank (DDP)
    for a, b in zip(mine, ref):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    sharded.step()
    plain.step()
    sharded.zero_grad()
    plain.zero_grad()


for seed in range(3):
    step(seed)
same = all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(mine, ref))
held = sum(v.numel() for s in sharded.adamw.state.values() for k, v in s.items()
           if k in ("exp_avg", "exp_avg_sq"))
sharded.consolidate()
state_same = None
if rank == 0:
    full, expected = sharded.state_dict(), plain.state_dict()
    state_same = all(torch.equal(full["state"][i][k], expected["state"][i][k])
                     for i in range(2) for k in ("exp_avg", "exp_avg_sq", "step"))
# resume: a fresh optimizer loads the whole state on every rank, and steps on identically
again = ShardedAdamW(groups(mine), rank=rank, world_size=world, **kwargs)
again.load_state_dict(plain.state_dict())
sharded = again
step(7)
resumed_same = all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(mine, ref))
out = {"same": same, "held": held, "state_same": state_same, "resumed_same": resumed_same}
open(sys.argv[1] + f"/rank{rank}.json", "w").write(json.dumps(out))
"""


def test_sharded_adamw_splits_its_state_over_every_rank(tmp_path):
    """Three ranks: each holds about a third of the AdamW moments (it used to shard whole
    tensors, so with two matrices a third rank held nothing), and the parameters, the
    consolidated state and a resumed step equal a plain AdamW's."""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_ADAMW)
    _torchrun([str(script), str(tmp_path)], tmp_path, nproc=3)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["same"] and r["resumed_same"] for r in results)
    assert results[0]["state_same"] is True
    total = 2 * (10 * 4 + 7 * 3)  # two moments of every element
    held = [r["held"] for r in results]
    assert sum(held) == total and max(held) <= 2 * (4 * 4 + 3 * 3)  # at most ceil(rows/3)
