#!/usr/bin/env bash
# The long run of benchmarks/README.md ("train", long run): the dim-16 one-hot benchmark
# config as shipped, 2 ranks, STEPS (default 2000) timed steps, every 100 steps the
# throughput of the last 100 steps, the RSS summed over ranks and the rows stored.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
export OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1
"$MPIEXEC" -n "${NPS:-2}" "$PY" -m mpi4py -m hpctrain.bench train --dim 16 --bag 1 \
  --steps "${STEPS:-2000}" --warmup 3 --trace-every "${TRACE_EVERY:-100}" \
  --json "bench-results/train-long-n${NPS:-2}-d16.json"
