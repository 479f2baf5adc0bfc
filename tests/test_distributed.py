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


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
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
