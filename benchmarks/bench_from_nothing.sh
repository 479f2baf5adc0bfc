#!/usr/bin/env bash
# What a new user waits for (issue 21): in a fresh clone of this repository's HEAD, with no
# .venv and an empty LOOPEDLM_HOME, `./dev env`, then `./dev train`, then `./dev test`.
# Prints ./dev's line per set-up step (with its seconds), the training's own summary, the
# tests' summary, the seconds of each of the three, and the load average before and after.
#
#   bash benchmarks/bench_from_nothing.sh [TRAIN SETTINGS ...]   e.g. --steps=2 for a smoke run
#
# pip's own cache (~/.cache/pip) is used as it is: clear it too for a machine that has never
# downloaded the packages.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone -q "$repo" "$scratch/clone"
cd "$scratch/clone"
export LOOPEDLM_HOME="$scratch/home"
unset OMP_NUM_THREADS PYTHONPATH LOOPEDLM_VENV
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"
start=$SECONDS
./dev env
env_s=$((SECONDS - start))
start=$SECONDS
./dev train --run_dir="$scratch/run" "$@"
train_s=$((SECONDS - start))
start=$SECONDS
./dev test -p no:cacheprovider | tail -n 3
test_s=$((SECONDS - start))
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "set-up ${env_s} s; ./dev train after it ${train_s} s; ./dev test after it ${test_s} s;" \
     "from nothing: ./dev train $((env_s + train_s)) s, ./dev test $((env_s + test_s)) s"
