#!/usr/bin/env bash
# The slow checks: the serving stack (the slow tier of tests/test_serve.py: the 64 x 20 load
# test and the web page in headless chromium; the serving benchmark; the API fuzzed with 2,500
# requests; a 10 MB prompt), exported Hugging
# Face folders (the slow tier of tests/test_export_hf.py: the `lm_eval` command line, and
# every loop mode and attention variant under the oldest transformers the README claims, in
# a scratch venv under /tmp), and inductor's own code for the head's compiled chunk body and
# for the decode step on a CPU.
#   bash benchmarks/nightly.sh [RUN]     # RUN: a trained run folder (default: a stand-in)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -m slow tests/test_serve.py
python benchmarks/bench_serve.py ${1:+--run "$1"}
# the HTTP API fuzzed: 2,500 requests against one live server under 4 streaming clients; the
# summary line gives the count, the failures and the slowest /health (issue 22)
LOOPEDLM_FUZZ_EXAMPLES=2500 LOOPEDLM_FUZZ_LOAD=4 python -m pytest -s -p no:logging tests/test_serve_fuzz.py
python benchmarks/bench_serve_big_prompt.py

# the oldest transformers an exported folder supports (README, "Export to Hugging Face")
OLDEST_TRANSFORMERS=4.56.2
OLD_VENV=/tmp/loopedlm-transformers-$OLDEST_TRANSFORMERS
[ -x "$OLD_VENV/bin/python" ] || python3 -m venv "$OLD_VENV"
"$OLD_VENV/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" \
    "transformers==$OLDEST_TRANSFORMERS" safetensors
LOOPEDLM_OLDEST_TRANSFORMERS_PYTHON="$OLD_VENV/bin/python" python -m pytest -m slow tests/test_export_hf.py

# the slow tier of the training-side GPU-readiness tests (issue 24): inductor's own code for
# the head's compiled chunk body
python -m pytest -m slow tests/test_head_loss.py

# inductor's own code for the decode step on a CPU (the C++ wrapper, the default there), and
# AOTInductor packages of every loop mode, attention variant and step kind (the packaged loops
# of adaptive steps too, with shared cache slots), against the eager engine's tokens (issue 25)
python -m pytest -m slow tests/test_engine.py tests/test_packaged.py
