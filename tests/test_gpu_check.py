"""benchmarks/gpu_check.py, the script to run first on a GPU: its `--cpu` run passes every
check at toy sizes, and one failing or overlong check does not stop the others."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_run_passes_every_check_and_prints_the_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert out.startswith("# loopedlm GPU check: CPU (toy sizes), torch ")
    lines = {line.split()[1]: line.split()[0] for line in out.splitlines()
             if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP")}
    # every default check ran; cut-cross-entropy is CUDA-only, so the CPU run skips it
    assert lines.pop("head_cce") == "SKIP"
    assert set(lines.values()) == {"PASS"} and len(lines) == 11
    for figure in ("small N=3 compiled, training", "compile time N=12", "decode N=12 batch 1",
                   "small N=12 every-loop loss + checkpointing, peak", "eval N=1"):
        assert f"| {figure}" in out


def test_a_failing_or_slow_check_does_not_stop_the_others(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    def broken(sizes):
        raise RuntimeError("CUDA error: an illegal memory access\nmore")

    def slow(sizes):
        time.sleep(30)

    monkeypatch.setitem(gpu_check.CHECKS, "bf16_forward", (broken, 60, True))
    monkeypatch.setitem(gpu_check.CHECKS, "decode_graphs", (slow, 2, True))
    assert gpu_check.main(["--cpu", "--only", "bf16_forward,decode_graphs,eval_n1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  bf16_forward" in out and "RuntimeError: CUDA error: an illegal memory" in out
    assert "FAIL  decode_graphs" in out and "over its time budget of 1 s" in out
    assert "PASS  eval_n1" in out and "| eval N=1" in out


def test_unknown_check_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu", "--only", "bf16"])
    assert "--only 'bf16' is not a check" in capsys.readouterr().err
