#!/usr/bin/env bash
# One-command GPU check (issue 19): on a machine with an NVIDIA GPU, install the [gpu] extra
# into a fresh virtual environment, run the GPU tests, then benchmarks/gpu.py at box 128 and 256
# (particles/s per GPU for reconstruction and for the E-step, against one CPU core), all in
# under 8 minutes. Without a GPU it says so in one line and exits 2.
#
#   bash benchmarks/gpu_check.sh              # venv in .venv-gpu (reused if present)
#   GPU_CHECK_VENV=/tmp/v bash benchmarks/gpu_check.sh
#
# Exit status: 0 tests passed and the table printed; 1 a step failed; 2 no GPU here.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to check"
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
OUT=${GPU_CHECK_OUT:-$ROOT/benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "== $(( $(date +%s) - start )) s: $*"; }

step "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
if [ ! -x "$VENV/bin/python" ]; then
    step "fresh venv $VENV"
    "$PY" -m venv "$VENV"
fi
step "pip install -e .[gpu,test]"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e "$ROOT[gpu,test]"
"$VENV/bin/python" - <<'EOF'
import cupy
n = cupy.cuda.runtime.getDeviceCount()
print(f"   CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, {n} device(s)")
EOF

step "pytest -m gpu"
( cd "$ROOT" && timeout 300 "$VENV/bin/python" -m pytest -q -m gpu -p no:cacheprovider tests )

step "benchmarks/gpu.py --boxes 128 256"
( cd "$ROOT" && timeout 300 "$VENV/bin/python" benchmarks/gpu.py --boxes 128 256 \
    --json "$OUT/gpu.json" )
step "done: table above, JSON in $OUT/gpu.json"
