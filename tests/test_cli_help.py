"""Every command and sub-command answers `--help` (exit 0, a usage line), and the commands
that need no model start without importing torch (issue 21: every command took seconds
before doing anything, `--help` included)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loopedlm.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def _help(argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"loopedlm {' '.join(argv)} exited {code}: {err[-500:]}"
    return out


def _listed(help_text: str, metavar: str) -> list[str]:
    """The names a help text lists under a sub-command metavar (COMMAND, ACTION)."""
    lines = help_text.splitlines()
    start = lines.index(f"  {metavar}") + 1
    names = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        if not line.startswith("     "):  # a name, not a wrapped help line
            names.append(line.split()[0])
    return names


def test_loopedlm_help_lists_every_command(capsys):
    assert _listed(_help(["--help"], capsys), "COMMAND") == list(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_and_sub_command_answers_help(command, capsys):
    if command == "lm-eval":
        pytest.importorskip("lm_eval")
    out = _help([command, "--help"], capsys)
    if command == "lm-eval":
        # lm_eval's CLI gave its logger a handler on this test's captured stderr, which is
        # closed after the test: later tests that run lm-eval would log "Logging error"s
        for handler in logging.getLogger("lm_eval").handlers:
            if type(handler) is logging.StreamHandler:  # (not pytest's own, a subclass)
                handler.setStream(sys.__stderr__)
    assert ("usage: lm-eval" if command == "lm-eval" else f"loopedlm {command}") in out
    if "  ACTION" in out.splitlines():
        actions = _listed(out, "ACTION")
        assert actions
        for action in actions:
            assert f"loopedlm {command} {action}" in _help([command, action, "--help"], capsys)


QUICK = [["--help"], ["info", "--help"], ["eval", "--help"], ["eval-tasks"], ["sample", "--help"],
         ["serve", "--help"], ["data", "prepare", "--help"], ["tokenizer", "train", "--help"],
         ["sweep", "--help"], ["plot", "--help"], ["report", "--help"],
         ["import-nanochat", "--help"], ["export", "--help"]]
PROBE = """
import contextlib, io, json, sys
from loopedlm.cli import main
imported = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    imported[" ".join(argv)] = "torch" in sys.modules
print(json.dumps(imported))
"""


def test_commands_that_need_no_model_do_not_import_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOOPEDLM_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(QUICK)], env=env,
                            capture_output=True, text=True, check=True)
    imported = json.loads(result.stdout)
    assert imported == {" ".join(argv): False for argv in QUICK}


def _reference(capsys) -> str:
    """docs/cli.md: the --help of every command and sub-command (lm-eval's is lm-eval's own)."""
    parts = ["# The command line\n\nEvery command and sub-command, as `--help` prints it. Generated "
             "by `tests/test_cli_help.py` (`LOOPEDLM_UPDATE_DOCS=1 python -m pytest "
             "tests/test_cli_help.py` rewrites it).\n\n"
             "The loop count is `--n-loops` on every command that takes one (`eval`: a comma "
             "list). In `train`, `sweep` and `info` it is the shorthand of the ModelConfig field "
             "(`--model.n_loops=N`; info: `--n_loops=N`), the field syntax every field has, "
             "which stays. `eval --loops` is deprecated: it still works in this release, with "
             "a warning ([training.md](training.md)).\n"]
    for command in COMMANDS:
        if command == "lm-eval":
            parts.append("\n## loopedlm lm-eval\n\nlm-evaluation-harness's own command line "
                         "with the `loopedlm` model registered: `loopedlm lm-eval --help`.\n")
            continue
        out = _help([command, "--help"], capsys)
        parts.append(f"\n## loopedlm {command}\n\n```\n{out.rstrip()}\n```\n")
        if "  ACTION" in out.splitlines():
            for action in _listed(out, "ACTION"):
                sub = _help([command, action, "--help"], capsys)
                parts.append(f"\n### loopedlm {command} {action}\n\n```\n{sub.rstrip()}\n```\n")
    return "".join(parts)


def test_the_cli_reference_in_docs_is_up_to_date(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal's width
    reference, path = _reference(capsys), ROOT / "docs" / "cli.md"
    if os.environ.get("LOOPEDLM_UPDATE_DOCS"):
        path.write_text(reference)
    assert path.read_text() == reference, "run LOOPEDLM_UPDATE_DOCS=1 pytest tests/test_cli_help.py"
