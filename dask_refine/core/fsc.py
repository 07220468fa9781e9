"""Fourier shell correlation and resolution (shells one Fourier pixel wide, as RELION).

Shell ``i`` holds the rfft coefficients with ``round(|k|) == i`` (k in Fourier pixels), i = 0 … D/2.
Frequency of shell i: ``i / (D · pixel_size_A)`` 1/Å; resolution ``D · pixel_size_A / i`` Å.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy
from .fourier import centred_rfftn, rfft_multiplicity, rfft_radius


def shell_index(box_size: int, ndim: int, xp=np):
    """Shell index ``round(|k|)`` of every centred-rfft coefficient (int64)."""
    return xp.rint(rfft_radius(box_size, ndim, xp)).astype(xp.int64)


def shell_sums(values_rfft, box_size: int, ndim: int, n_shells: int | None = None) -> np.ndarray:
    """Sum of a real quantity on the centred rfft grid over each shell, counting Hermitian pairs.

    Returns float64 ``(n_shells,)`` (default ``D // 2 + 1``); coefficients beyond are dropped.
    """
    xp = array_module(values_rfft)
    n_shells = box_size // 2 + 1 if n_shells is None else n_shells
    shells = shell_index(box_size, ndim, xp)
    mult = rfft_multiplicity(box_size, ndim, xp)
    keep = shells < n_shells
    sums = xp.bincount(shells[keep], weights=(values_rfft * mult)[keep], minlength=n_shells)
    return to_numpy(sums).astype(np.float64)


def fsc(map_a, map_b) -> np.ndarray:
    """FSC between two real volumes ``(D, D, D)``: float64 ``(D//2 + 1,)``, shell 0 … D/2.

    ``FSC_i = Σ Re(F_a F_b*) / √(Σ|F_a|² Σ|F_b|²)`` over shell i. Shells with no power give 0.
    """
    box = map_a.shape[-1]
    fa, fb = centred_rfftn(map_a, 3), centred_rfftn(map_b, 3)
    num = shell_sums((fa * fb.conj()).real, box, 3)
    den = np.sqrt(shell_sums(abs(fa) ** 2, box, 3) * shell_sums(abs(fb) ** 2, box, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def shell_resolution_A(box_size: int, pixel_size_A: float) -> np.ndarray:
    """Resolution in Å of each shell 0 … D/2 (``inf`` for shell 0)."""
    shells = np.arange(box_size // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return box_size * pixel_size_A / shells


def resolution_at_threshold(fsc_curve, box_size: int, pixel_size_A: float,
                            threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC first falls below ``threshold`` (linear in frequency).

    Shell 0 is skipped. If the curve never falls below, the Nyquist resolution ``2·pixel_size_A``
    is returned; if it is below from shell 1 on, the resolution of shell 1 (the box size in Å).
    """
    curve = np.asarray(fsc_curve, dtype=np.float64)
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            if i == 1:
                return float(box_size * pixel_size_A)
            f0, f1 = curve[i - 1], curve[i]
            shell = (i - 1) + (f0 - threshold) / (f0 - f1)
            return float(box_size * pixel_size_A / shell)
    return float(2.0 * pixel_size_A)


def ssnr_from_fsc(fsc_curve, full_map: bool = False) -> np.ndarray:
    """Spectral SNR per shell from a half-map FSC (RELION ``updateSSNRarrays``).

    Half map: ``SSNR = FSC / (1 − FSC)``. The full map (both halves, twice the particles) has
    twice that: ``2·FSC / (1 − FSC)``. The FSC is clipped to [0.001, 0.999] first.
    """
    c = np.clip(np.asarray(fsc_curve, dtype=np.float64), 0.001, 0.999)
    return (2.0 if full_map else 1.0) * c / (1.0 - c)
