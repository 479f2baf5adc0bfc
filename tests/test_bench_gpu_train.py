"""benchmarks/bench_gpu_train.py runs (here on CPU, at a toy size) and prints its table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_prints_one_row_per_setting():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu_train.py"),
                          "--quick", "--loops", "2", "--loss", "all", "--checkpointing", "on"],
                         capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:5] == ["tiny", "2", "eager", "all", "on"]
    tokens_per_s, mfu, peak_gib = cells[5:8]
    assert float(tokens_per_s.replace(",", "")) > 0 and mfu == "-" and float(peak_gib) > 0
    assert re.match(r"# CPU, torch ", out)


def test_bad_compile_mode_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu_train

    monkeypatch.setattr(sys, "argv", ["bench_gpu_train.py", "--compile", "jit"])
    with pytest.raises(SystemExit):
        bench_gpu_train.main()
    assert "--compile 'jit' is not allowed" in capsys.readouterr().err
