#!/usr/bin/env bash
# Install the peer programs that benchmarks/reconstruct.py and benchmarks/refine.py compare
# against. They are never dependencies of dask_refine. Safe to run again (idempotent).
#   RELION 3.1  Debian package `relion`: relion_reconstruct[_mpi], relion_refine[_mpi]
#   cryoDRGN    PyPI, with a CPU torch 2.13.0 wheel, in its own venv benchmarks/.peers/cryodrgn-venv
#   RELION 5    optional, built from a RELION source checkout (3dem/relion, tag 5.0.1) given with
#               --relion5-source PATH: CPU only, no GUI, installed into benchmarks/.peers/relion5
#               (its binaries are benchmarks/.peers/relion5/bin/relion_*; the checkout is only read)
# Usage: bash benchmarks/install_peers.sh [--relion5-source PATH]   (benchmarks/.peers/ is git-ignored)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
relion5_source=""
while [ $# -gt 0 ]; do
  case "$1" in
    --relion5-source) relion5_source="${2:?--relion5-source needs the path of a RELION checkout}"; shift 2 ;;
    *) echo "unknown argument: $1 (usage: install_peers.sh [--relion5-source PATH])" >&2; exit 2 ;;
  esac
done
if [ -n "$relion5_source" ] && { [ ! -f "$relion5_source/CMakeLists.txt" ] || [ ! -d "$relion5_source/src" ]; }; then
  echo "--relion5-source $relion5_source: not a RELION source checkout (no CMakeLists.txt, src/)" >&2
  exit 2
fi

# --- RELION (needs root for apt; skipped with a message otherwise) ---------------------------
if [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion
elif ! command -v relion_reconstruct >/dev/null 2>&1; then
  echo "RELION is not installed and apt needs root: run 'apt-get install relion' as root" >&2
fi

# --- RELION 5 from source (optional) --------------------------------------------------------
relion5="$here/.peers/relion5"
if [ -n "$relion5_source" ]; then
  if [ ! -x "$relion5/bin/relion_refine" ]; then
    # build headers and libraries: FFTW, TIFF, PNG, MPI (apt as root; else they must be there)
    if [ "$(id -u)" -eq 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ libopenmpi-dev \
        libfftw3-dev libtiff-dev libpng-dev
    fi
    build="$here/.peers/relion5-build"
    mkdir -p "$build"
    # CPU only, no GUI, no model weights (Blush / ModelAngelo are not used by the benchmarks)
    cmake -S "$relion5_source" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCUDA=OFF -DGUI=OFF \
      -DFETCH_WEIGHTS=OFF -DCMAKE_INSTALL_PREFIX="$relion5" >"$build/cmake.log" 2>&1 \
      || { echo "RELION 5 cmake failed: see $build/cmake.log" >&2; exit 1; }
    cmake --build "$build" -j "$(nproc)" >"$build/build.log" 2>&1 \
      || { echo "RELION 5 build failed: see $build/build.log" >&2; exit 1; }
    cmake --install "$build" >>"$build/build.log" 2>&1
  fi
  echo "RELION 5: $relion5/bin/relion_refine ($("$relion5/bin/relion_refine" --version 2>/dev/null | head -1 || true))"
fi

# --- cryoDRGN in its own venv ------------------------------------------------------------------
venv="$here/.peers/cryodrgn-venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$here/.peers"
  "$python" -m venv "$venv"
fi
# pip is a no-op when the pinned versions are already there
"$venv/bin/pip" install --quiet "torch==2.13.0" cryodrgn

relion_version="$(relion_reconstruct --version 2>/dev/null | head -1 || true)"
echo "RELION:   $(command -v relion_reconstruct || echo 'not found') (${relion_version})"
versions="$("$venv/bin/python" -c \
  'import cryodrgn, torch; print("cryodrgn", cryodrgn.__version__, "torch", torch.__version__)')"
echo "cryoDRGN: $venv/bin/cryodrgn ($versions)"
