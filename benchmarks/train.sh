#!/usr/bin/env bash
# End-to-end DLRM training benchmark at 1 and 2 ranks; one process per case so that
# peak RSS is that case's. Figures: benchmarks/README.md, section "train".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
export OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1
for n in 1 2; do
  for bag in 1 20; do
    for dim in 16 64; do
      "$MPIEXEC" -n "$n" "$PY" -m mpi4py -m hpctrain.bench train --dim "$dim" --bag "$bag" \
        --steps 40 --warmup 3 --json "bench-results/train-n$n-d$dim-bag$bag.json"
    done
  done
done
