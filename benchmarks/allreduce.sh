#!/usr/bin/env bash
# The allreduce figures of benchmarks/README.md: NP ranks (default 2), 8 B .. 16 MiB,
# hpctrain and raw mpi4py timed in 200 interleaved pairs of calls per size.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
export OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1
exec "$MPIEXEC" -n "$NP" "$PY" -m mpi4py -m hpctrain.bench allreduce \
    --max-bytes 16M --rounds 10 --repeat 20 --json "bench-results/allreduce-$NP.json" "$@"
