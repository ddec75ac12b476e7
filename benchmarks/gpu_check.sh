#!/usr/bin/env bash
# On a GPU host: the GPU tests and the GPU benchmarks of device = "gpu", in one run, with the
# figures printed at the end (the card's name first) for benchmarks/README.md, section "gpu".
#
#   benchmarks/gpu_check.sh                 # 1 rank; and 2 ranks when 2+ GPUs are visible
#   NPS="1 2 4" benchmarks/gpu_check.sh     # world sizes of the multi-rank parts
#
# Needs CuPy with NCCL in the venv (pip install -e ".[mpich,test,gpu]"). TF32 is forced off
# (CUPY_TF32=0): the tests compare GPU losses with CPU losses to 1e-4. Results and logs go
# to bench-results/gpu-<date>/. Takes a few minutes; nothing here needs more than one node.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MPIEXEC=${MPIEXEC:-$(dirname "$PY")/mpiexec}
OUT=${OUT:-bench-results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export CUPY_TF32=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HPCTRAIN_NUM_THREADS=${HPCTRAIN_NUM_THREADS:-4}
status=0
step() { echo; echo "=== $*"; }

step "host"
nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv \
    | tee "$OUT/nvidia-smi.csv" || echo "nvidia-smi not available"
NGPU=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
if [ "$NGPU" -lt 1 ]; then
    echo "no GPU visible to CuPy here: nothing to check" >&2
    "$PY" -c "import cupy" || true
    exit 2
fi
NPS=${NPS:-$([ "$NGPU" -ge 2 ] && echo "1 2" || echo "1")}
"$PY" -m hpctrain info | tee "$OUT/info.txt"

step "GPU tests (marker gpu), 1 rank"
"$PY" -m pytest -p no:cacheprovider -m gpu -v -rs --timeout 900 \
    tests/test_device_path.py tests/test_dense_gpu.py tests/test_nccl.py \
    tests/test_dense_models.py 2>&1 | tee "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for NP in $NPS; do
    [ "$NP" -gt 1 ] || continue
    step "NCCL tests on $NP ranks"
    "$MPIEXEC" -n "$NP" "$PY" -m mpi4py -m pytest -p no:cacheprovider -q tests/test_nccl.py \
        2>&1 | tee "$OUT/pytest-nccl-$NP.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

for NP in $NPS; do
    step "bench dense --device gpu, $NP rank(s)"
    "$MPIEXEC" -n "$NP" "$PY" -m mpi4py -m hpctrain.bench dense --device gpu --dims 16,64 \
        --batch 4096 --warmup 5 --repeat 30 --json "$OUT/dense-gpu-$NP.json" \
        || status=1
    step "bench train --device gpu, $NP rank(s)"
    "$MPIEXEC" -n "$NP" "$PY" -m mpi4py -m hpctrain.bench train --device gpu --bag 1 \
        --dim 16 --dim 64 --steps ${STEPS:-40} --warmup 3 --json "$OUT/train-gpu-$NP.json" \
        || status=1
done
step "bench train --device cpu, 1 rank (the same workload on the host, for comparison)"
"$PY" -m hpctrain.bench train --device cpu --bag 1 --dim 16 --steps ${STEPS:-40} --warmup 3 \
    --json "$OUT/train-cpu-1.json" || status=1

step "figures"
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
smi = os.path.join(out, "nvidia-smi.csv")
if os.path.exists(smi):
    print("card:", "; ".join(l.strip() for l in open(smi).readlines()[1:]))
for path in sorted(glob.glob(os.path.join(out, "dense-gpu-*.json"))):
    d = json.load(open(path))
    print(f"\ndense step, {d['world_size']} rank(s), {d['device']}, TF32 {d['tf32']}:")
    for r in d["rows"]:
        print(f"  d={r['d']}: step {r['step']['p50'] * 1e3:.3f} ms, GEMM {r['gemm']['p50'] * 1e3:.3f}"
              f" ms, NCCL {r['raw_allreduce']['p50'] * 1e3:.3f} ms, ratio {r['ratio']:.3f} "
              f"(goal <= {r['goal']}: {'met' if r['met'] else 'NOT met'}), "
              f"{r['step_gflops']:.0f} GFLOP/s")
for path in sorted(glob.glob(os.path.join(out, "train-*.json"))):
    d = json.load(open(path))
    print(f"\ntrain, {d['world_size']} rank(s), device {d['device']}, TF32 {d['tf32']}:")
    for r in d["results"]:
        ph = r["phase_ms_per_step"]
        hid = "-" if r["copies_hidden"] is None else f"{r['copies_hidden']:.0%}"
        print(f"  dim {r['dim']} bag {r['bag']} on {r['device']}: {r['samples_per_s']:,.0f} "
              f"samples/s, step {r['median_step_s'] * 1e3:.2f} ms; per step (ms) h2d "
              f"{ph['h2d']:.3f} dense {ph['dense']:.3f} nccl {ph['nccl']:.3f} d2h "
              f"{ph['d2h']:.3f} sparse {ph['sparse']:.3f}; dense-only / (GEMM + allreduce) "
              f"{r['dense_vs_bare']:.3f}; copies hidden {hid}")
EOF
echo
echo "results in $OUT; exit status $status"
exit $status
