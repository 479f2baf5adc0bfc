#!/usr/bin/env bash
# The slow checks: the slow test tier of tests/test_serve.py (the
# 64 x 20 load test and the web page in headless chromium) and the serving benchmark.
#   bash benchmarks/nightly.sh [RUN]     # RUN: a trained run folder (default: a stand-in)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -m slow tests/test_serve.py
python benchmarks/bench_serve.py ${1:+--run "$1"}
# the slow tier of the training-side GPU-readiness tests (issue 24): inductor's own code for
# the head's compiled chunk body
python -m pytest -m slow tests/test_head_loss.py
