#!/usr/bin/env bash
# Sharded embedding step and its exchanges vs raw Alltoallv, at 1 and 2 ranks, 1 thread each
# (the settings of the figures in benchmarks/README.md, section "exchange").
# Results: $OUT/exchange-1.json and $OUT/exchange-2.json (OUT defaults to bench-results).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
OUT=${OUT:-bench-results}
export OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1
for n in 1 2; do
  "$MPIEXEC" -n "$n" "$PY" -m mpi4py -m hpctrain.bench exchange --threads 1 \
    --batch 4096 --features 26 --vocab 1000000 --zipf 1.05 --dims 16,64 \
    --warmup 3 --repeat 20 --json "$OUT/exchange-$n.json" "$@"
done
