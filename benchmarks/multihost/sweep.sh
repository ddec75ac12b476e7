#!/usr/bin/env bash
# sweep.sh - the multi-host figures of benchmarks/README.md: the scaling sweep on 1, 2 and 4
# emulated nodes (hosts.sh, one rank each) under each link profile, then the cost model with
# the inter-node link fitted from that profile's own allreduce/alltoallv runs, and one plot of
# predicted against measured step times.
#
#   benchmarks/multihost/sweep.sh                  measure and model every profile
#   MEASURE=0 benchmarks/multihost/sweep.sh        model and plot the results already there
#
# Environment: PROFILES (default "10gbit 1gbit"), TRIALS (best of, default 3), BATCH (samples
# per rank in weak scaling, default 1024), OUT (default bench-results/multihost), PYTHON.
# Extra arguments go to `python -m hpctrain.bench scaling`. Needs root (hosts.sh); the hosts
# are torn down at the end, also on failure. The emulated nodes share this machine's cores:
# with more ranks than cores the points are oversubscribed (the cost model marks them).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-results/multihost}
PROFILES=${PROFILES:-10gbit 1gbit}
HOSTS=benchmarks/multihost/hosts.sh

if [ "${MEASURE:-1}" = 1 ]; then
  export PYTHONFAULTHANDLER=1      # a rank that crashes prints where
  trap '"$HOSTS" down >/dev/null 2>&1 || true' EXIT
  "$HOSTS" up 4 none
  for rate in $PROFILES; do
    "$HOSTS" rate "$rate"
    echo "# $rate: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    (
      eval "$("$HOSTS" env 1)"     # one rank per host: P ranks on P nodes
      "$PY" -m hpctrain.bench scaling --ranks 1,2,4 \
          --benchmarks allreduce,alltoallv,exchange,train --batch "${BATCH:-1024}" \
          --trials "${TRIALS:-3}" --allreduce-args "--max-bytes 4M --rounds 3 --repeat 20" \
          --alltoallv-args "--max-bytes 4M --rounds 3 --repeat 20" --out "$OUT/$rate" "$@"
    )
    echo "# $rate: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
fi
for rate in $PROFILES; do
  "$PY" -m hpctrain.bench costmodel --results "$OUT/$rate" --net-fit --ranks-per-node 1 \
      --json "$OUT/$rate/costmodel.json" | tee "$OUT/$rate/costmodel.txt"
done
"$PY" benchmarks/multihost/plot.py --out benchmarks/multihost.png \
    $(for rate in $PROFILES; do echo "$rate=$OUT/$rate/costmodel.json"; done)
