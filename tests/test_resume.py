"""Exact resume (issue 4): on CPU in fp32 a stopped-and-resumed run has the same losses as
an uninterrupted one, step for step, also after a kill -9 in the middle of a save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import losses, small_config, train_cli

from loopedlm.model.checkpoint import SAVE_SLEEP_ENV, latest_training_checkpoint, load_model
from loopedlm.train.trainer import train


def _truncate_to(src: Path, dst: Path, step: int) -> None:
    """A copy of a finished run as if it had been stopped right after saving `step`."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (dst / "summary.json").unlink()


@pytest.mark.parametrize("stop_at", [2, 6])
def test_resume_equals_uninterrupted(tmp_path, corpus, reference, stop_at):
    run = tmp_path / "run"
    _truncate_to(reference, run, stop_at)
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5, resume=True))
    assert summary["step"] == 8
    assert losses(run) == losses(reference)  # exact, every step (the log keeps steps <= 2)
    assert summary["val_bpb"] == json.loads((reference / "summary.json").read_text())["val_bpb"]


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, corpus, reference):
    run = tmp_path / "run"
    env = {**os.environ, SAVE_SLEEP_ENV: "60@4"}
    proc = subprocess.Popen(train_cli(run, corpus, 8), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    tmp_ckpt = run / "checkpoints" / ".tmp_step_000004"
    deadline = time.time() + 60
    while not (tmp_ckpt / "train_state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the save of step 4 never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing step 4
    proc.wait()
    assert latest_training_checkpoint(run).name == "step_000002"
    model, meta = load_model(run)
    assert meta["step"] == 2
    # resume: the half-written folder is replaced; the losses are the uninterrupted ones
    done = subprocess.run(train_cli(run, corpus, 8, resume=True), capture_output=True, text=True,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "final validation bits-per-byte" in done.stdout
    assert not tmp_ckpt.exists()
    assert losses(run) == losses(reference)


@pytest.mark.parametrize("kills", [1, pytest.param(20, marks=pytest.mark.slow)])
def test_repeated_kill_9_during_saves_always_leaves_a_loadable_checkpoint(tmp_path, corpus,
                                                                          kills):
    """kill -9 at a random moment inside a save (every step saves), again and again: the
    newest intact checkpoint always loads, every step_* folder verifies, and --resume goes
    on from it."""
    import random

    from loopedlm.model.checkpoint import TRAIN_FILES, load_training_state, verify_checkpoint
    rng = random.Random(kills)
    run = tmp_path / "run"
    args = ["--save_every=1", "--keep_last=3", "--eval_every=0"]
    last_step = 1  # the first kill comes after step 1 is saved: there is a previous one
    for attempt in range(kills):
        proc = subprocess.Popen(train_cli(run, corpus, 10_000, resume=attempt > 0) + args,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.time()
        # wait for a save after the one resumed from, then kill at a random point inside it
        while not any(int(p.name.rsplit("_", 1)[1]) > last_step
                      for p in (run / "checkpoints").glob(".tmp_step_*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() - started < 120, "no save started"
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        newest = latest_training_checkpoint(run)
        assert newest is not None
        load_training_state(newest)
        for folder in (run / "checkpoints").glob("step_*"):
            verify_checkpoint(folder, TRAIN_FILES)
        assert int(newest.name[5:]) >= last_step
        last_step = int(newest.name[5:])
