"""Figures that jobs write next to their outputs (Matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_fsc_png(path, fsc_curves: dict[str, np.ndarray], box_size: int, pixel_size_A: float,
                  resolution_A: float | None = None, title: str = "Fourier shell correlation"):
    """Plot FSC curves (label → curve over shells 0 … D/2) against 1/Å, with the 0.143 and 0.5
    lines, and write it atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in fsc_curves.items():
        curve = np.asarray(curve)
        freq = np.arange(curve.size) / (box_size * pixel_size_A)
        ax.plot(freq, curve, label=label, lw=1.6)
    ax.axhline(0.143, color="0.4", ls="--", lw=0.8, label="0.143")
    ax.axhline(0.5, color="0.7", ls=":", lw=0.8, label="0.5")
    if resolution_A:
        ax.axvline(1.0 / resolution_A, color="C3", lw=0.8)
        title = f"{title}: {resolution_A:.2f} Å at 0.143"
    ax.set(xlabel="spatial frequency (1/Å)", ylabel="FSC", ylim=(-0.1, 1.05), title=title)
    ax.set_xlim(0, 1.0 / (2 * pixel_size_A))
    top = ax.secondary_xaxis("top", functions=(lambda f: 1 / np.maximum(f, 1e-9),
                                                lambda r: 1 / np.maximum(r, 1e-9)))
    nyquist = 2 * pixel_size_A
    ticks = [r for r in (50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1.2, 1.0)
             if r >= nyquist and r <= 10 * nyquist]
    top.set_xticks(ticks, labels=[f"{r:g}" for r in ticks])
    top.set_xlabel("resolution (Å)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
