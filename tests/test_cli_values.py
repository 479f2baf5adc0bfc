"""Each CLI value has one home (issue 23).

The loop count has one spelling on every command, `--n-loops`: `sample` takes one count,
`eval` a comma list; `train`, `sweep` and `info` take `--n-loops N` as the shorthand of their
ModelConfig field (`--model.n_loops=N`; info: `--n_loops=N`), which stays the field syntax,
without a warning. `eval --loops` is the one old spelling: it still works for one release,
with one deprecation line on stderr. And a `sample` or `serve` flag left unset takes the
library's default (GenerationOptions, ServeConfig), not a copy of it.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket

import pytest
from conftest import tiny_model

from loopedlm.cli import main
from loopedlm.common.overrides import parse_overrides
from loopedlm.common.validation import ConfigError
from loopedlm.train.config import SHORTHANDS, build_config, parse_train_args


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _train_loops(args: list[str]) -> int:
    recipe, overrides = parse_train_args(args)
    return build_config(recipe, overrides).model_config().n_loops


@pytest.mark.parametrize("args", [["--n-loops", "6"], ["--n-loops=6"], ["--n_loops=6"],
                                  ["--model.n_loops=6"], ["tiny", "--n-loops", "6"],
                                  ["--n-loops", "6", "tiny"]])
def test_train_takes_n_loops_as_the_shorthand_of_the_model_field(args):
    assert _train_loops(args) == 6


def test_the_shorthand_needs_a_value_and_the_config_checks_it():
    with pytest.raises(ConfigError, match="--n-loops needs a value"):
        parse_train_args(["--n-loops"])
    with pytest.raises(ConfigError, match="--n-loops needs a value"):
        parse_train_args(["--n-loops", "--steps=2"])
    with pytest.raises(ValueError, match="n_loops=0 is not allowed"):
        _train_loops(["--n-loops", "0"])
    # the shorthand is train's only; elsewhere a bare value is still an error
    with pytest.raises(ValueError, match="unexpected argument '6'"):
        parse_overrides(["--steps", "6"], sections=("model",), shorthands=SHORTHANDS)


@pytest.mark.parametrize("argv", [["train", "--n-loops", "5", "--print-config"],
                                  ["train", "--model.n_loops=5", "--print-config"],
                                  ["info", "tiny", "--n-loops", "5", "--json"],
                                  ["info", "tiny", "--n-loops=5", "--json"],
                                  ["info", "tiny", "--n_loops=5", "--json"]])
def test_train_and_info_read_every_spelling_without_a_warning(argv):
    code, out, err = _cli(argv)
    assert code == 0 and err == ""
    shown = json.loads(out)
    assert (shown["model"] if argv[0] == "train" else shown["config"])["n_loops"] == 5


def test_sweep_passes_n_loops_to_every_run(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[sweep]\nrecipe = "tiny"\n[train]\nsteps = 2\n[grid]\n'
                    '"model.loop_mode" = ["lt", "flt"]\n')
    code, out, err = _cli(["sweep", str(path), "--dry-run", "--n-loops", "7", "--out",
                           str(tmp_path / "o")])
    commands = [line for line in out.splitlines() if line.startswith("    ")]
    assert code == 0 and err == "" and len(commands) == 2
    assert all("--model.n_loops=7" in line for line in commands)


@pytest.mark.parametrize("spelling, warned", [("--n-loops", False), ("--loops", True)])
def test_eval_takes_n_loops_and_the_old_spelling_warns(spelling, warned, tmp_path):
    # a bad count is refused before anything loads: the value reached the evaluator
    code, _, err = _cli(["eval", str(tmp_path / "no_run"), spelling, "1,0"])
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1] == ("loopedlm eval: error: loop count 0 is not allowed: "
                                       "loop counts must be >= 1")
    if warned:
        assert lines[:-1] == ["loopedlm eval: warning: --loops is deprecated and goes in the "
                              "next release: use --n-loops"]
    else:
        assert lines[:-1] == []


def test_sample_takes_n_loops(tmp_path):
    code, _, err = _cli(["sample", str(tmp_path / "no_run"), "--prompt", "x", "--n-loops", "2"])
    assert code == 2 and "warning" not in err
    with pytest.raises(SystemExit):  # argparse: --n-loops takes an integer
        _cli(["sample", str(tmp_path / "no_run"), "--prompt", "x", "--n-loops", "two"])


TEXTS = ["To be, or not to be, that is the question. Whether 'tis nobler in the mind."] * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random FLT saved as a run (checkpoint + tokenizer)."""
    from loopedlm.data.tokenizer_training import train_tokenizer
    from loopedlm.model.checkpoint import save_model

    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = tiny_model(std=0.1, vocab_size=tokenizer.vocab_size, sequence_len=48)
    run = tmp_path_factory.mktemp("cli_values") / "run"
    save_model(run / "checkpoints" / "step_000010", model)
    tokenizer.save(run / "tokenizer")
    return run


def test_sample_flags_left_unset_take_the_librarys_defaults(run_dir):
    from loopedlm.data.runs import load_run
    from loopedlm.infer.generate import generate

    code, out, _ = _cli(["sample", str(run_dir), "--prompt", "To be", "--temperature", "0",
                         "--device", "cpu"])
    run = load_run(run_dir)
    expected = generate(run.model, "To be", tokenizer=run.tokenizer, temperature=0,
                        stop=run.tokenizer.bos_id)
    assert code == 0 and out == "To be" + expected.texts[0] + "\n"


def test_serve_flags_left_unset_take_serve_configs_defaults(run_dir, monkeypatch):
    pytest.importorskip("fastapi")
    from loopedlm.infer import server

    listened = []

    def listen(host, port):  # where serve takes its port (before loading), recorded
        listened.append((host, port))
        return socket.socket()

    monkeypatch.setattr(server, "listen", listen)
    monkeypatch.setattr(server.uvicorn.Server, "run", lambda self, sockets=None: None)
    assert _cli(["serve", str(run_dir), "--device", "cpu"])[0] == 0
    assert _cli(["serve", str(run_dir), "--device", "cpu", "--port", "8123"])[0] == 0
    default = server.ServeConfig()
    assert listened == [(default.host, default.port), (default.host, 8123)]
