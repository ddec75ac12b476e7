#!/usr/bin/env bash
# hpctrain vs TorchRec on the DLRM training benchmark, in pairs run back to back.
#
# For every layout, case (dim, bag) and pair, hpctrain's `bench train` and TorchRec's
# bench_torchrec.py run one after the other on the same workload, the order alternating
# from pair to pair (odd pairs hpctrain first); then ratios.py divides hpctrain's samples/s
# by TorchRec's per pair and writes the table to $RATIOS_JSON.
#
#   dmp:   mpiexec -n $PROCS ... hpctrain.bench train --threads 1   (OMP_NUM_THREADS=1)
#          vs bench_torchrec.py --mode dmp --procs $PROCS --threads 1
#   fused: python -m hpctrain.bench train --threads $THREADS        (1 rank, OMP_NUM_THREADS unset)
#          vs bench_torchrec.py --mode fused --threads $THREADS
#
#   benchmarks/torchrec/compare.sh                       # everything, PAIRS=3, 40 steps
#   PAIRS=1 STEPS=5 WARMUP=2 DIMS=16 BAGS=1 LAYOUTS=dmp benchmarks/torchrec/compare.sh
#
# Run it on an otherwise idle machine: one benchmark at a time, nothing else running.
set -euo pipefail

HPCTRAIN_PY=${HPCTRAIN_PY:-/work/main/.venv/bin/python}
TORCHREC_PY=${TORCHREC_PY:-/tmp/trvenv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$HPCTRAIN_PY")/mpiexec}
PAIRS=${PAIRS:-3}
STEPS=${STEPS:-40}
WARMUP=${WARMUP:-3}
DIMS=${DIMS:-16 64}
BAGS=${BAGS:-1 20}
LAYOUTS=${LAYOUTS:-dmp fused}
PROCS=${PROCS:-2}                     # dmp: ranks / processes
THREADS=${THREADS:-2}                 # fused: threads of the one process
BATCHES=${BATCHES:-thread}            # TorchRec's feeding: thread | pregenerated
EMB_OPTIMIZER=${EMB_OPTIMIZER:-adagrad}   # rowwise_adagrad is NOT what hpctrain runs
HPCTRAIN_ARGS=${HPCTRAIN_ARGS:-}      # extra bench train options, e.g. --reserve
TORCHREC_ARGS=${TORCHREC_ARGS:-}      # extra bench_torchrec.py options
OUT=${OUT:-bench-results/torchrec-compare}
RATIOS_JSON=${RATIOS_JSON:-bench-results/torchrec-compare.json}

HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."
mkdir -p "$OUT"
MANIFEST="$OUT/pairs.tsv"
printf 'layout\tdim\tbag\tpair\tfirst\tload_before\thpctrain_json\ttorchrec_json\n' > "$MANIFEST"

run_hpctrain() {   # layout dim bag json
  local layout=$1 dim=$2 bag=$3 json=$4
  echo "== hpctrain $layout d$dim bag $bag -> $json"
  if [ "$layout" = dmp ]; then
    env OMP_NUM_THREADS=1 HPCTRAIN_NUM_THREADS=1 "$MPIEXEC" -n "$PROCS" "$HPCTRAIN_PY" \
      -m mpi4py -m hpctrain.bench train --dim "$dim" --bag "$bag" --steps "$STEPS" \
      --warmup "$WARMUP" --threads 1 --json "$json" $HPCTRAIN_ARGS
  else
    env -u OMP_NUM_THREADS -u HPCTRAIN_NUM_THREADS "$HPCTRAIN_PY" -m hpctrain.bench train \
      --dim "$dim" --bag "$bag" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" \
      --json "$json" $HPCTRAIN_ARGS
  fi
}

run_torchrec() {   # layout dim bag json
  local layout=$1 dim=$2 bag=$3 json=$4
  echo "== torchrec $layout d$dim bag $bag -> $json"
  if [ "$layout" = dmp ]; then
    env OMP_NUM_THREADS=1 "$TORCHREC_PY" "$HERE/bench_torchrec.py" --mode dmp \
      --procs "$PROCS" --threads 1 --dim "$dim" --bag "$bag" --steps "$STEPS" \
      --warmup "$WARMUP" --batches "$BATCHES" --emb-optimizer "$EMB_OPTIMIZER" \
      --json "$json" $TORCHREC_ARGS
  else
    env -u OMP_NUM_THREADS "$TORCHREC_PY" "$HERE/bench_torchrec.py" --mode fused \
      --threads "$THREADS" --dim "$dim" --bag "$bag" --steps "$STEPS" --warmup "$WARMUP" \
      --batches "$BATCHES" --emb-optimizer "$EMB_OPTIMIZER" --json "$json" $TORCHREC_ARGS
  fi
}

once_more() {      # a run that fails is tried once more (said in the log), then the script stops
  "$@" || { echo "compare.sh: '$1 $2 $3 $4' failed; trying it once more" >&2; "$@"; }
}

for layout in $LAYOUTS; do
  case $layout in dmp|fused) ;; *) echo "compare.sh: unknown layout $layout" >&2; exit 2;; esac
  for bag in $BAGS; do
    for dim in $DIMS; do
      for ((p = 1; p <= PAIRS; p++)); do
        hp="$OUT/hpctrain-$layout-d$dim-bag$bag-p$p.json"
        tr="$OUT/torchrec-$layout-d$dim-bag$bag-p$p.json"
        load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo -)
        if ((p % 2)); then
          first=hpctrain
          once_more run_hpctrain "$layout" "$dim" "$bag" "$hp"
          once_more run_torchrec "$layout" "$dim" "$bag" "$tr"
        else
          first=torchrec
          once_more run_torchrec "$layout" "$dim" "$bag" "$tr"
          once_more run_hpctrain "$layout" "$dim" "$bag" "$hp"
        fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$layout" "$dim" "$bag" "$p" "$first" \
          "$load" "$hp" "$tr" >> "$MANIFEST"
      done
    done
  done
done

"$HPCTRAIN_PY" "$HERE/ratios.py" "$MANIFEST" --json "$RATIOS_JSON"
