#!/usr/bin/env bash
# Install the peer programs the benchmarks compare against. They are never dependencies of
# dask_refine. Idempotent.
#   RELION 3.1 (Debian package relion: relion_reconstruct, relion_refine[_mpi])
#   cryoDRGN (PyPI, with the CPU torch 2.13.0 wheel) in its own venv: benchmarks/.peers/cryodrgn-venv
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v relion_reconstruct >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion
fi
venv="$here/.peers/cryodrgn-venv"
if [ ! -x "$venv/bin/cryodrgn" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "torch==2.13.0" cryodrgn
fi
echo "RELION: $(command -v relion_reconstruct)"
echo "cryoDRGN: $venv/bin/cryodrgn"
