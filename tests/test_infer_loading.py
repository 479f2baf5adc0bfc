"""`load_run_tokenizer`: the one place `loopedlm sample`, `loopedlm serve` and the decoding
benchmarks find a run's tokenizer."""

from __future__ import annotations

import pytest
from test_kv_cache import make_model

from loopedlm.cli import main
from loopedlm.data.tokenizer_training import train_tokenizer
from loopedlm.infer.loading import load_run_tokenizer
from loopedlm.model.checkpoint import save_model

TEXT = ["Now is the winter of our discontent made glorious summer by this sun of York."] * 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one tiny model: one with its tokenizer saved beside the checkpoints,
    one without."""
    root = tmp_path_factory.mktemp("runs")
    tokenizer = train_tokenizer(TEXT, vocab_size=280)
    model = make_model(vocab_size=tokenizer.vocab_size)
    for name in ("with", "without"):
        save_model(root / name / "checkpoints" / "step_000001", model)
    tokenizer.save(root / "with" / "tokenizer")
    return root, tokenizer


def test_the_tokenizer_of_a_run_or_of_its_checkpoint_folder(runs):
    root, tokenizer = runs
    for path in (root / "with", root / "with" / "checkpoints" / "step_000001"):
        loaded = load_run_tokenizer(path)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode(TEXT[0]) == tokenizer.encode(TEXT[0])


def test_a_run_without_a_tokenizer_is_named_in_one_error(runs):
    root, _ = runs
    with pytest.raises(FileNotFoundError, match="has no tokenizer/ folder"):
        load_run_tokenizer(root / "without")


@pytest.mark.parametrize("command", [["sample", "--prompt", "a"], ["serve"]])
def test_sample_and_serve_report_a_missing_tokenizer_in_one_line(runs, command, capsys):
    if command[0] == "serve":
        pytest.importorskip("fastapi")
    root, _ = runs
    run = str(root / "without")
    assert main([command[0], run, *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loopedlm {command[0]}: error: {run} has no tokenizer/ folder beside its "
                   f"checkpoints"]


@pytest.mark.parametrize("omp,threads", [(None, 1), ("2", 2)])
def test_sample_decodes_on_one_cpu_thread_unless_told(runs, monkeypatch, capsys, omp, threads):
    """Decoding's small products gain nothing from more threads (issue 21); training and
    evaluation keep torch's default. OMP_NUM_THREADS, when set, is the user's choice."""
    import torch

    root, _ = runs
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    torch.set_num_threads(2)  # as a process starts on 2 cores (conftest restores it)
    assert main(["sample", str(root / "with"), "--prompt", "Now", "--max-tokens", "2",
                 "--device", "cpu"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert torch.get_num_threads() == threads
