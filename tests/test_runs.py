"""`load_run`: the one way `loopedlm sample`, `loopedlm serve`, `loopedlm eval`, the
lm-eval adapter and the benchmarks load a run's model and tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from loopedlm.cli import main
from loopedlm.data.runs import load_run
from loopedlm.data.tokenizer_training import train_tokenizer
from loopedlm.model.checkpoint import save_model

TEXT = ["Now is the winter of our discontent made glorious summer by this sun of York."] * 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one tiny model: one with its tokenizer saved beside the checkpoints,
    one without."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = train_tokenizer(TEXT, vocab_size=280)
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    for name in ("with", "without"):
        save_model(root / name / "checkpoints" / "step_000001", model)
    tokenizer.save(root / "with" / "tokenizer")
    return root, tokenizer, model


def test_the_model_and_tokenizer_of_a_run_or_of_its_checkpoint_folder(runs):
    root, tokenizer, model = runs
    checkpoint = root / "with" / "checkpoints" / "step_000001"
    for path in (root / "with", checkpoint):
        loaded = load_run(path)
        assert loaded.folder == checkpoint and loaded.meta["model"] == model.config.to_dict()
        assert loaded.tokenizer.vocab_size == tokenizer.vocab_size
        assert loaded.tokenizer.encode(TEXT[0]) == tokenizer.encode(TEXT[0])
        idx = torch.tensor([tokenizer.encode(TEXT[0])[:10]])
        assert torch.equal(loaded.model(idx), model(idx)) and not loaded.model.training


def test_a_run_without_a_tokenizer_is_named_in_one_error(runs):
    root, _, _ = runs
    with pytest.raises(FileNotFoundError, match="has no tokenizer/ folder"):
        load_run(root / "without")
    assert load_run(root / "without", tokenizer=str(root / "with")).tokenizer is not None


def test_a_tokenizer_larger_than_the_model_is_refused(runs, tmp_path):
    root, _, _ = runs
    big = train_tokenizer(TEXT * 3 + ["a whole new vocabulary of words and more words"],
                          vocab_size=400)
    big.save(tmp_path / "big")
    with pytest.raises(ValueError, match="tokens but the model's vocab_size is"):
        load_run(root / "with", tokenizer=str(tmp_path / "big"))


# (serve takes its port before it loads the run: --port 0, as 8000 may be in use here)
@pytest.mark.parametrize("command", [["sample", "--prompt", "a"], ["serve", "--port", "0"]])
def test_sample_and_serve_report_a_missing_tokenizer_in_one_line(runs, command, capsys):
    if command[0] == "serve":
        pytest.importorskip("fastapi")
    root, _, _ = runs
    run = str(root / "without")
    assert main([command[0], run, *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loopedlm {command[0]}: error: {run} has no tokenizer/ folder beside its "
                   f"checkpoints"]


@pytest.mark.parametrize("omp,threads", [(None, 1), ("2", 2)])
def test_sample_decodes_on_one_cpu_thread_unless_told(runs, monkeypatch, capsys, omp, threads):
    """Decoding's small products gain nothing from more threads (issue 21); training and
    evaluation keep torch's default. OMP_NUM_THREADS, when set, is the user's choice."""
    root, _, _ = runs
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(2)  # as a process starts on 2 cores (conftest restores it)
    assert main(["sample", str(root / "with"), "--prompt", "Now", "--max-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert torch.get_num_threads() == threads
