"""Faults during training (issue 13): out of memory, a full disk while saving, SIGTERM,
plain progress lines without a terminal; and the small CLI things (booleans, the resolved
config of a recipe, the batch-size hint)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from train_helpers import losses, small_config, train_cli

from loopedlm.cli.train import main as train_main
from loopedlm.cli.train import run_cli
from loopedlm.common.validation import ConfigError
from loopedlm.model import checkpoint
from loopedlm.model.checkpoint import SAVE_SLEEP_ENV, latest_training_checkpoint, load_model
from loopedlm.model.gpt import LoopedGPT
from loopedlm.train.config import TrainConfig, build_config, parse_train_args
from loopedlm.train.sizing import check_batch
from loopedlm.train.trainer import train


def _poison_step(monkeypatch, step: int, action) -> None:
    """Call `action()` in the first training forward of `step` (2 micro-batches a step)."""
    calls = {"n": 0}
    forward = LoopedGPT.forward

    def wrapped(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2 * (step - 1) + 1:
                action()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LoopedGPT, "forward", wrapped)


def _cli_args(run, corpus, steps: int) -> list[str]:
    return train_cli(run, corpus, steps)[3:]  # without `python -m loopedlm.train`


# ---- out of memory -------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                           "capacity of 79.1 GiB of which 1.2 GiB is free."),
    MemoryError(),
])
def test_out_of_memory_is_one_line_naming_settings(tmp_path, corpus, monkeypatch, capsys,
                                                   error):
    def oom():
        raise error

    _poison_step(monkeypatch, 5, oom)
    run = tmp_path / "run"
    code = train_main(_cli_args(run, corpus, 8))
    err = capsys.readouterr().err
    assert code == 4
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert line.startswith("loopedlm train: error: out of memory at step 5")
    assert "--device_batch_size=" in line and "--activation_checkpointing=true" in line
    assert ("2.00 GiB" in line) == isinstance(error, torch.OutOfMemoryError)
    assert "step_000004" in line
    assert latest_training_checkpoint(run).name == "step_000004"
    load_model(run)
    assert json.loads((run / "summary.json").read_text())["status"] == "out_of_memory"


# ---- a full disk ---------------------------------------------------------------------
def test_full_disk_during_training_save(tmp_path, corpus, monkeypatch, capsys):
    save = torch.save
    calls = {"n": 0}

    def fills_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the save of step 4
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fills_up)
    run = tmp_path / "run"
    code = train_main(_cli_args(run, corpus, 8))
    err = capsys.readouterr().err
    assert code == 5 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "step_000004" in line and "No space left" in line and "step_000002 is intact" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert load_model(run)[1]["step"] == 2


# ---- SIGTERM -------------------------------------------------------------------------
def test_sigterm_saves_then_resume_is_exact(tmp_path, corpus, reference, monkeypatch):
    _poison_step(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    run = tmp_path / "run"
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5))
    assert summary["status"] == "interrupted" and summary["step"] == 5
    assert latest_training_checkpoint(run).name == "step_000005"  # not a save_every step
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is put back
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5, resume=True))
    assert summary["step"] == 8 and summary["status"] == "completed"
    assert losses(run) == losses(reference)


def _signal_during_save(run, corpus, save: str, signals: list[int]) -> tuple[int, str, str]:
    """Run the training CLI (8 steps, a save every 2) and send it `signals`, 0.5 s apart,
    while it saves step S (`save` is "SECONDS@S": that save sleeps SECONDS);
    (exit code, stdout, stderr)."""
    env = {**os.environ, SAVE_SLEEP_ENV: save}
    proc = subprocess.Popen(train_cli(run, corpus, 8), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    step = int(save.split("@")[1])
    saving = run / "checkpoints" / f".tmp_step_{step:06d}" / "train_state.pt"
    deadline = time.time() + 120
    while not saving.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"the save of step {step} never started"
        time.sleep(0.05)
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.5)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_sigterm_to_the_process_exits_0_and_resumes(tmp_path, corpus, reference):
    run = tmp_path / "run"
    code, out, err = _signal_during_save(run, corpus, "1@4", [signal.SIGTERM])
    assert code == 0, err
    assert "SIGTERM at step 4" in out and "--resume" in out
    assert latest_training_checkpoint(run).name == "step_000004"
    # the CLI's settings are small_config's (train_helpers.train_cli): resume in-process
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5, resume=True))
    assert summary["status"] == "completed"
    assert losses(run) == losses(reference)


# ---- Ctrl-C (SIGINT: issue 22, D4) ------------------------------------------------------
def test_ctrl_c_saves_then_resume_is_exact(tmp_path, corpus, reference, monkeypatch):
    """Ctrl-C at a step that is not a save step: handled as SIGTERM."""
    before = signal.getsignal(signal.SIGINT)  # (ignored where a shell started us in the background)
    _poison_step(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    run = tmp_path / "run"
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5))
    assert summary["status"] == "interrupted" and summary["step"] == 5
    assert summary["message"].startswith("SIGINT at step 5: saved checkpoint step_000005")
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) == before  # put back
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5, resume=True))
    assert summary["step"] == 8 and summary["status"] == "completed"
    assert losses(run) == losses(reference)


def test_ctrl_c_to_the_process_exits_0_with_one_line_and_resumes(tmp_path, corpus, reference):
    run = tmp_path / "run"
    code, out, err = _signal_during_save(run, corpus, "2@2", [signal.SIGINT])
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "SIGINT at step 2: saved checkpoint step_000002" in out and "--resume" in out
    assert "Ctrl-C again aborts at once" in err
    assert latest_training_checkpoint(run).name == "step_000002"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    summary = train(small_config(run, *corpus, steps=8, save_every=2, keep_last=5, resume=True))
    assert summary["status"] == "completed"
    assert losses(run) == losses(reference)


def test_a_second_ctrl_c_aborts_at_once_in_one_line(tmp_path, corpus):
    run = tmp_path / "run"
    code, _, err = _signal_during_save(run, corpus, "30@2", [signal.SIGINT] * 2)  # not 30 s
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "loopedlm train: interrupted (Ctrl-C)"
    assert latest_training_checkpoint(run) is None  # the half-written save does not count


# ---- progress without a terminal -----------------------------------------------------
def test_plain_progress_lines_without_a_tty(tmp_path, corpus, caplog):
    with caplog.at_level(logging.INFO, logger="loopedlm.train"):
        train(small_config(tmp_path / "run", *corpus, steps=6, eval_every=3, progress=True,
                           print_every=2))
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if " loss " in line]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]
    assert all("tokens/s" in line and "left" in line for line in steps)
    evals = [line for line in lines if "val bpb" in line]
    assert [line.split()[1] for line in evals] == ["3/6", "6/6"]
    assert all("tokens)" in line for line in evals)


def test_train_and_eval_measure_the_same_validation_tokens(tmp_path, corpus):
    from loopedlm.data.runs import load_run
    from loopedlm.evaluate.budget import evaluate_budget
    from loopedlm.evaluate.loading import val_settings

    run = tmp_path / "run"
    summary = train(small_config(run, *corpus, steps=3, eval_every=0, eval_tokens=512))
    model, tok, folder, meta = load_run(run)
    results = evaluate_budget(model, tok, [model.config.n_loops], data_dir=corpus[0],
                              **val_settings(meta, model, None, None))
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val_bpb" in r][-1]
    assert results["metrics"]["val_tokens"][str(model.config.n_loops)] == val["val_tokens"]
    assert results["metrics"]["val_bpb"][str(model.config.n_loops)] == pytest.approx(
        summary["val_bpb"], rel=1e-9)


# ---- configuration -------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("TRUE", True),
                                        ("1", True), ("0", False), ("yes", True), ("No", False),
                                        ("on", True), ("off", False)])
def test_boolean_spellings(text, value):
    _, overrides = parse_train_args([f"--progress={text}", f"--optim.scale_adamw_by_width={text}"])
    cfg = build_config("tiny", overrides)
    assert cfg.progress is value and cfg.optim.scale_adamw_by_width is value


def test_bad_boolean_names_the_spellings():
    _, overrides = parse_train_args(["--progress=maybe"])
    with pytest.raises(ConfigError, match="progress='maybe'.*true or false.*yes/no"):
        build_config("tiny", overrides)


def test_batch_error_names_the_setting_to_pass():
    cfg = TrainConfig(total_batch_tokens=4096, device_batch_size=16)
    with pytest.raises(ConfigError, match="pass --device_batch_size=8"):
        check_batch(cfg, 256, 2)
    with pytest.raises(ConfigError, match="pass --total_batch_tokens=512"):
        check_batch(TrainConfig(total_batch_tokens=128, device_batch_size=2), 256, 1)


def test_print_config_resolves_the_recipe_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["small", "--print-config", "--steps=7", "--model.n_loops=6"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 7 and resolved["train"]["compile"] is True
    assert resolved["model"]["n_loops"] == 6 and resolved["model"]["sequence_len"] == 1024
    assert resolved["model"]["d_model"] > 0 and not (tmp_path / "runs").exists()


def test_help_shows_the_recipes_values(capsys):
    assert run_cli(["small", "--help"]) == 0
    out = capsys.readouterr().out
    assert "recipe small" in out and "--save_every=1000" in out and "--keep_last=3" in out
    assert "--model.sequence_len=1024" in out
    assert run_cli(["--help"]) == 0
    assert "--save_every=80" in capsys.readouterr().out  # the default recipe: tiny
