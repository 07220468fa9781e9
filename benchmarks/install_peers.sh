#!/usr/bin/env bash
# Install the peer programs that benchmarks/reconstruct.py and benchmarks/refine.py compare
# against. They are never dependencies of dask_refine. Safe to run again (idempotent).
#   RELION 3.1  Debian package `relion`: relion_reconstruct[_mpi], relion_refine[_mpi]
#   cryoDRGN    PyPI, with a CPU torch 2.13.0 wheel, in its own venv benchmarks/.peers/cryodrgn-venv
# Usage: bash benchmarks/install_peers.sh        (benchmarks/.peers/ is git-ignored)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

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
