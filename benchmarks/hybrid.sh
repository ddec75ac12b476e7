#!/usr/bin/env bash
# Hybrid mode against the collective trainer on the DLRM benchmark workload: 1 server + 2
# workers (3 ranks; the collective trainer at 2 and 3 ranks in the same job), throughput vs
# s and ASP for G = 1 and 2, transient and persistent stragglers, staleness, pull round trip,
# server apply time, convergence over 3 seeds. Figures: benchmarks/README.md, "hybrid".
# RANKS=5 gives 1 server + 4 workers (stragglers with G = 4: STRAGGLER_GROUPS=4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
RANKS=${RANKS:-3}
export OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), $(getconf _NPROCESSORS_ONLN) core(s)"
"$MPIEXEC" -n "$RANKS" "$PY" -m mpi4py -m hpctrain.bench hybrid --servers 1 \
    --straggler-groups "${STRAGGLER_GROUPS:-2}" --json "bench-results/hybrid-$RANKS.json" "$@"
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
"$PY" -m hpctrain.bench costmodel --hybrid "bench-results/hybrid-$RANKS.json" \
    --json "bench-results/hybrid-$RANKS-costmodel.json"
