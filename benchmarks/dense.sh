#!/usr/bin/env bash
# The dense figures of benchmarks/README.md: DLRM dense step (d = 16 and 64, batch 4096 per
# rank, Adam) on 1 and 2 ranks with one BLAS thread per rank, the bare matrix products and a
# raw MPI allreduce timed in the same run, 20 interleaved repetitions after 3 warm-ups.
# NPS="1 2" picks the world sizes; extra arguments go to the benchmark (e.g. --threads 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
export OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
for NP in ${NPS:-1 2}; do
    "$MPIEXEC" -n "$NP" "$PY" -m mpi4py -m hpctrain.bench dense --dims 16,64 --batch 4096 \
        --threads 1 --warmup 3 --repeat 20 --json "bench-results/dense-$NP.json" "$@"
done
