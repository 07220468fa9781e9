"""Where the benchmarks find their peer programs (installed by ``benchmarks/install_peers.sh``).

RELION is taken from ``--relion-bin DIR`` when given (e.g. ``benchmarks/.peers/relion5/bin``,
RELION 5 built from source by ``install_peers.sh --relion5-source PATH``), else from ``PATH``
(Debian's RELION 3.1 package).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def relion_program(name: str, relion_bin: str | None = None) -> str | None:
    """Absolute path of RELION's ``name`` (``relion_refine_mpi`` …) in ``relion_bin`` or on
    ``PATH``; None when it is not there."""
    if relion_bin:
        path = Path(relion_bin) / name
        return str(path.resolve()) if path.is_file() else None
    return shutil.which(name)


def relion_label(relion_bin: str | None = None) -> str:
    """``"RELION 5.0.1"``-style name of the RELION that :func:`relion_program` finds (its own
    ``--version`` line), for table rows; ``"RELION"`` when it does not say."""
    program = relion_program("relion_refine", relion_bin)
    if program is None:
        return "RELION"
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "RELION"
    for line in (out.stdout + out.stderr).splitlines():
        words = line.replace("RELION version:", "").split()
        if line.startswith("RELION version") and words:
            return "RELION " + words[0].split("-")[0]
    return "RELION"
