"""Damaged checkpoints (issue 13): every checkpoint carries a manifest (sizes + sha256,
written last); a damaged file is one line naming the file and the fault; a run folder
falls back to its newest intact checkpoint (load_model, `sample`, `eval`, `--resume`);
a failed save (full disk) leaves the previous checkpoint intact."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from train_helpers import losses, make_corpus, small_config

from loopedlm.cli import main as cli_main
from loopedlm.cli.train import main as train_main
from loopedlm.common.files import sha256_file
from loopedlm.model import checkpoint
from loopedlm.model.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    CheckpointSaveError,
    latest_training_checkpoint,
    load_model,
    load_training_state,
    save_model,
    save_training_checkpoint,
    verify_checkpoint,
)
from loopedlm.train.trainer import train


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "missing": (Path.unlink, "is missing"),
    "bit_flip": (_flip_bit, "does not match its sha256"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """A 6-step run with intact checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(small_config(run, *corpus, steps=6, save_every=2, keep_last=5))
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_manifest_lists_every_file_with_size_and_hash(finished_run):
    for ckpt in sorted((finished_run / "checkpoints").glob("step_*")):
        files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
        assert set(files) == {p.name for p in ckpt.iterdir()} - {MANIFEST_FILE}
        for name, entry in files.items():
            assert entry["size"] == (ckpt / name).stat().st_size
            assert entry["sha256"] == sha256_file(ckpt / name)
        verify_checkpoint(ckpt, checkpoint.TRAIN_FILES)


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", "train_state.json",
                                  "config.json"])
def test_damaged_file_is_one_line_naming_file_and_fault(tmp_path, finished_run, name, damage):
    run = _copy(finished_run, tmp_path)
    newest = run / "checkpoints" / "step_000006"
    do, words = DAMAGE[damage]
    do(newest / name)
    with pytest.raises(CheckpointError) as info:
        load_training_state(newest)
    message = str(info.value)
    assert "\n" not in message and name in message and words in message and "step_000006" in message
    # the run falls back to the newest intact checkpoint
    assert latest_training_checkpoint(run).name == "step_000004"


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_load_model_of_a_run_falls_back_and_says_so(tmp_path, finished_run, name, caplog):
    run = _copy(finished_run, tmp_path)
    _truncate(run / "checkpoints" / "step_000006" / name)
    with caplog.at_level(logging.WARNING):
        model, meta = load_model(run)
    assert meta["step"] == 4
    assert "step_000006" in caplog.text and name in caplog.text and "step_000004" in caplog.text
    with pytest.raises(CheckpointError, match=f"{name}.*truncated"):
        load_model(run / "checkpoints" / "step_000006")  # asked for by name: no fallback


def test_every_checkpoint_damaged_is_an_error(tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    for ckpt in (run / "checkpoints").glob("step_*"):
        _flip_bit(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step_000006"):
        load_model(run)


def test_old_checkpoint_without_manifest_loads(tmp_path, caplog):
    model = tiny_model()
    folder = save_model(tmp_path / "m", model, {"step": 1})
    (folder / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.DEBUG, logger="loopedlm.model.checkpoint"):
        loaded, meta = load_model(folder)
    assert "without verifying" in caplog.text
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.equal(loaded(x), model(x))
    # without a manifest a truncated file is still one line naming it
    _truncate(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        load_model(folder)


def test_sample_and_eval_cli_fall_back(tmp_path, finished_run, capsys):
    run = _copy(finished_run, tmp_path)
    _truncate(run / "checkpoints" / "step_000006" / "model.safetensors")
    assert cli_main(["sample", str(run), "--prompt", "the", "--max-tokens", "2"]) == 0
    # a damaged checkpoint given by name: one line, exit 2
    code = cli_main(["sample", str(run / "checkpoints" / "step_000006"), "--prompt", "the"])
    err = capsys.readouterr().err
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("loopedlm sample: error:") and "Traceback" not in err
    assert "model.safetensors" in last and "truncated" in last


def test_resume_falls_back_to_newest_intact_and_says_so(tmp_path, finished_run, corpus, caplog):
    run = _copy(finished_run, tmp_path)
    for ckpt in (run / "checkpoints").glob("step_00000[6]"):
        _truncate(ckpt / "train_state.pt")
    (run / "summary.json").unlink()
    with caplog.at_level(logging.WARNING):
        summary = train(small_config(run, *corpus, steps=6, save_every=2, keep_last=5,
                                     resume=True))
    assert "train_state.pt" in caplog.text and "step_000004" in caplog.text
    assert summary["step"] == 6
    assert losses(run) == losses(finished_run)  # exact: redone from step 4
    verify_checkpoint(run / "checkpoints" / "step_000006", checkpoint.TRAIN_FILES)


def test_resume_cli_with_every_checkpoint_damaged_is_one_line(tmp_path, finished_run, corpus,
                                                              capsys):
    run = _copy(finished_run, tmp_path)
    for ckpt in (run / "checkpoints").glob("step_*"):
        _truncate(ckpt / "train_state.pt")
    data_dir, tok_dir = corpus
    code = train_main([f"--run_dir={run}", "--resume", f"--data_dir={data_dir}",
                       f"--tokenizer={tok_dir}", "--device=cpu", "--progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "train_state.pt" in lines[0] and "truncated" in lines[0]
    assert "Traceback" not in err


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    args = dict(meta={"step": 1}, tensor_state={"x": torch.zeros(2)}, json_state={"step": 1})
    save_training_checkpoint(tmp_path, 1, model, **args)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError, match="step_000002.*No space left.*step_000001 is intact"):
        save_training_checkpoint(tmp_path, 2, model, **args)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert latest_training_checkpoint(tmp_path).name == "step_000001"
    load_training_state(tmp_path / "checkpoints" / "step_000001")


def test_eval_loads_the_newest_intact_checkpoint(tmp_path, finished_run):
    from loopedlm.data.runs import load_run
    run = _copy(finished_run, tmp_path)
    _flip_bit(run / "checkpoints" / "step_000006" / "model.safetensors")
    model, tok, folder, meta = load_run(run)
    assert folder.name == "step_000004" and meta["step"] == 4


def test_sample_after_a_prompt_ending_in_a_space_has_no_double_space(finished_run, capsys):
    """Regression (issue 13): `--prompt "the "` printed "the  king": the model was fed a lone
    space token and then chose a word that brings its own space."""
    from loopedlm.data.tokenizer import load_tokenizer
    from loopedlm.infer.generate import generate

    assert cli_main(["sample", str(finished_run), "--prompt", "the ", "--max-tokens", "6",
                     "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    model, _ = load_model(finished_run)
    tok = load_tokenizer(finished_run / "tokenizer")
    expected = generate(model, "the", tokenizer=tok, max_tokens=6, temperature=0,
                        stop=[tok.bos_id]).texts[0]
    assert out == "the" + expected + "\n"  # conditioned on, and printed as, "the"
    assert not out.startswith("the  ")
