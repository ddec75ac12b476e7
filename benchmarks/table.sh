#!/usr/bin/env bash
# The table figures of benchmarks/README.md: one embedding table shard, batches of 4096 x 26
# ids drawn Zipf(1.05) over 10^6 ids per feature, dim 16 and 64, 2 OpenMP threads, every
# optimizer; np.take and a Python dict are the baselines, timed interleaved with the table;
# find is also timed at 10 table sizes over one growth cycle of the index (700k to 875k rows).
# Idle OpenMP threads spin only briefly (GOMP_SPINCOUNT=20000, under a millisecond) before they
# sleep: long spins steal the shared cores from the working thread, no spin makes every
# parallel region wait for a thread to wake up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export GOMP_SPINCOUNT=${GOMP_SPINCOUNT:-20000}
exec "$PY" -m hpctrain.bench table --threads 2 --dims 16,64 --warmup 3 --repeat 30 \
    --cycle-rows 700000 \
    --json bench-results/table-1.json "$@"
