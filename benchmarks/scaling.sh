#!/usr/bin/env bash
# The scaling figures of benchmarks/README.md: every benchmark at 1, 2 and 4 ranks (weak and,
# where the benchmark takes a batch, strong scaling), the best of 2 trials per point, then the
# cost model fitted from them and its predicted-vs-measured table. Copies the plot to
# benchmarks/scaling.png and prints the load average before and after (record it with the
# figures). Inside a Slurm allocation use slurm/scaling.sbatch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-results/scaling}
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
"$PY" -m hpctrain.bench scaling --ranks "${RANKS:-1,2,4}" \
    --benchmarks allreduce,alltoallv,exchange,dense,table,train --batch 2048 --trials 2 \
    --allreduce-args "--max-bytes 16M" --alltoallv-args "--max-bytes 4M" --out "$OUT" "$@"
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
cp "$OUT/scaling.png" benchmarks/scaling.png 2>/dev/null || true
"$PY" -m hpctrain.bench costmodel --results "$OUT" --interconnect ib_hdr --ranks-per-node 8 \
    --json "$OUT/costmodel.json"
