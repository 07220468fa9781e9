"""Writing a job's small outputs atomically: JSON, CSV tables."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def write_csv(path, columns: dict[str, list]) -> None:
    """Write equal-length columns (header = keys) as CSV, atomically."""
    path = Path(path)
    tmp = _tmp(path)
    names = list(columns)
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in zip(*(columns[n] for n in names)):
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    os.replace(tmp, path)
