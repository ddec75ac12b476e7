#!/usr/bin/env bash
# Builds the virtual environment of the TorchRec side of benchmarks/torchrec (CPU only):
# torch 2.13.0+cpu, fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0 and the pure-Python packages that
# importing them needs, all pinned in requirements.txt and installed without dependency
# resolution (torchrec declares the CUDA build fbgemm-gpu, which must not come in), plus the
# hpctrain checkout on the path (a .pth file: its kernels as built in place, nothing built).
#
#   benchmarks/torchrec/setup.sh [VENV]          VENV default /tmp/trvenv
#
# Environment: PYTHON (default python3) must be the CPython the checkout's kernels were
# built for (hpctrain/_kernels/*.cpython-311-*.so: 3.11); TORCH_WHEELS (default /opt/wheels)
# a folder holding torch-2.13.0+cpu's wheel, else it comes from the PyTorch CPU index
# (https://download.pytorch.org/whl/cpu, named in requirements.txt).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${1:-${TORCHREC_VENV:-/tmp/trvenv}}
PYTHON=${PYTHON:-python3}
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}

"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
links=()
if [ -d "$TORCH_WHEELS" ]; then
  links=(--find-links "$TORCH_WHEELS")
fi
"$PY" -m pip install --no-deps ${links[@]+"${links[@]}"} -r "$HERE/requirements.txt"
# never the CUDA build next to the CPU one
if "$PY" -m pip show fbgemm-gpu >/dev/null 2>&1; then
  "$PY" -m pip uninstall -y fbgemm-gpu
fi

# the hpctrain checkout on the path; `pip install -e` would rebuild its kernels inside the
# checkout instead, so it is not used
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$REPO" > "$site/hpctrain-checkout.pth"

if ! "$PY" - <<'EOF'
import sys
import torch, torchrec, fbgemm_gpu
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection  # noqa
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa
print(f"torch {torch.__version__}, torchrec {torchrec.__version__}, "
      f"fbgemm_gpu {fbgemm_gpu.__version__}, Python {sys.version.split()[0]}")
import hpctrain.data.synthetic, hpctrain._kernels.table  # noqa
print(f"hpctrain from {hpctrain.__file__}")
EOF
then
  echo "setup.sh: the imports above failed. If it is hpctrain's kernels: they must be built" >&2
  echo "  for this venv's Python: (cd $REPO && $PY setup.py build_ext --inplace) with" >&2
  echo "  Cython, NumPy and an OpenMP compiler (this rebuilds them in the checkout)." >&2
  exit 1
fi
echo "setup.sh: $VENV ready; run benchmarks/torchrec/compare.sh with TORCHREC_PY=$PY"
