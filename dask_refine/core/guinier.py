"""Guinier analysis of a map and its B-factor, as RELION ``relion_postprocess --auto_bfac``.

Matches RELION 5.0 ``src/postprocessing.cpp`` (``makeGuinierPlot``, ``applyFscWeighting``,
``sharpenMap``), ``src/funcs.cpp::fitStraightLine`` and ``src/fftw.cpp::applyBFactorToMap``:

* Guinier curve: ``ln`` of the mean Fourier amplitude ``|F|`` of each shell ``round(|k|) = i``
  (i = 0 … D/2, transform normalised by 1/D³ as RELION's) against ``s² = (i / (D·px))²`` in 1/Å².
* FSC weighting (Rosenthal & Henderson 2003): each shell × ``√(2·FSC / (1 + FSC))`` up to the
  last shell before the FSC first drops below 1e-4, zero beyond (those shells leave the fit).
* Fit: an unweighted least-squares line through the shells whose resolution lies in
  ``[fit_high_A, fit_low_A]`` (RELION ``--autob_lowres 10``, ``--autob_highres 0``: from 10 Å to
  Nyquist, i.e. in practice to where the FSC weighting has zeroed the amplitudes).
* Sign: ``B = 4 · slope``. A map whose amplitudes fall as ``exp(−B_blur s²/4)`` gives
  ``B = −B_blur``: the reported B-factor is the (negative) sharpening B-factor, and
  :func:`apply_bfactor` with it, ``× exp(−(B/4) s²)``, flattens the spectrum.

Shells and layouts follow :mod:`.fsc` (centred rfft, full-transform means).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fourier import centred_irfftn, centred_rfftn, rfft_radius
from .fsc import shell_sums

MIN_FIT_SHELLS = 3


@dataclass(frozen=True)
class GuinierFit:
    """Per-shell curves ``(D//2 + 1,)`` and the straight-line fit (None, and no shell in the
    fit, with fewer than ``MIN_FIT_SHELLS`` shells in range).

    ``ln_amplitude``: ln mean |F| (NaN where a shell has no amplitude);
    ``ln_amplitude_weighted``: after FSC weighting (equal to ``ln_amplitude`` without an FSC);
    ``in_fit``: the shells the line was fitted to; ``corr_coeff``: r² of the fit (RELION's)."""

    s2_invA2: np.ndarray
    ln_amplitude: np.ndarray
    ln_amplitude_weighted: np.ndarray
    in_fit: np.ndarray
    bfactor_A2: float | None
    slope: float | None
    intercept: float | None
    corr_coeff: float | None

    @property
    def fit_range_A(self) -> tuple[float, float] | None:
        """(lowest, highest) resolution in Å of the shells in the fit."""
        if not self.in_fit.any():
            return None
        s = np.sqrt(self.s2_invA2[self.in_fit])
        return float(1.0 / s.min()), float(1.0 / s.max())


def radial_amplitude(volume) -> np.ndarray:
    """Mean Fourier amplitude ``|F|`` per shell 0 … D/2 of a real ``(D, D, D)`` map, the
    transform normalised by 1/D³ (RELION ``FourierTransformer`` with normalisation). float64."""
    box = volume.shape[-1]
    f = np.abs(centred_rfftn(np.asarray(volume, np.float64), 3)) / box ** 3
    return shell_sums(f, box, 3) / np.maximum(shell_sums(np.ones_like(f), box, 3), 1.0)


def fsc_weights(fsc_curve) -> np.ndarray:
    """RELION ``applyFscWeighting``: ``√(2·FSC/(1+FSC))`` per shell up to the last shell before
    the FSC first drops below 1e-4, 0 beyond and where the FSC is ≤ 0."""
    curve = np.asarray(fsc_curve, dtype=np.float64)
    low = np.flatnonzero(curve < 1e-4)
    last = (low[0] - 1) if low.size else curve.size - 1
    positive = np.maximum(curve, 0.0)
    weights = np.sqrt(2.0 * positive / (1.0 + positive))
    weights[last + 1:] = 0.0
    return weights


def guinier_bfactor(volume, pixel_size_A: float, fsc_curve=None, fit_low_A: float = 10.0,
                    fit_high_A: float | None = None) -> GuinierFit:
    """Guinier curve of ``volume`` and the B-factor (Å², RELION's sign) of a line through the
    shells between ``fit_low_A`` and ``fit_high_A`` Å (None: Nyquist); with ``fsc_curve``
    (half-map FSC, shells 0 … D/2) the curve is FSC-weighted first, as RELION postprocess."""
    box = volume.shape[-1]
    shells = np.arange(box // 2 + 1, dtype=np.float64)
    s2 = (shells / (box * pixel_size_A)) ** 2
    amplitude = radial_amplitude(volume)
    weighted = amplitude * (1.0 if fsc_curve is None else fsc_weights(fsc_curve)[:shells.size])
    with np.errstate(divide="ignore"):
        ln_amp = np.where(amplitude > 0, np.log(amplitude), np.nan)
        ln_weighted = np.where(weighted > 0, np.log(weighted), np.nan)
        resolution = np.where(shells > 0, box * pixel_size_A / np.maximum(shells, 1), np.inf)
    in_fit = ((resolution <= fit_low_A) & (resolution >= (fit_high_A or 0.0))
              & np.isfinite(ln_weighted))
    slope = intercept = r2 = bfactor = None
    if in_fit.sum() >= MIN_FIT_SHELLS:
        slope, intercept, r2 = _fit_line(s2[in_fit], ln_weighted[in_fit])
        bfactor = 4.0 * slope
    else:
        in_fit[:] = False
    return GuinierFit(s2, ln_amp, ln_weighted, in_fit, bfactor, slope, intercept, r2)


def _fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares ``y = slope·x + intercept`` and r² (RELION ``fitStraightLine``, w = 1)."""
    xm, ym = x.mean(), y.mean()
    sxx, syy, sxy = ((x - xm) ** 2).sum(), ((y - ym) ** 2).sum(), ((x - xm) * (y - ym)).sum()
    slope = sxy / sxx
    return float(slope), float(ym - slope * xm), float(sxy * sxy / (sxx * syy)) if syy > 0 else 1.0


def apply_bfactor(volume, bfactor_A2: float, pixel_size_A: float):
    """RELION ``applyBFactorToMap``: multiply the transform by ``exp(−(B/4)·s²)`` up to Nyquist
    and zero it beyond (negative B sharpens, positive B blurs). Same dtype and shape."""
    box = volume.shape[-1]
    s = rfft_radius(box, 3) / (box * pixel_size_A)
    envelope = np.where(s <= 0.5 / pixel_size_A, np.exp(-(bfactor_A2 / 4.0) * s ** 2), 0.0)
    f = centred_rfftn(np.asarray(volume, np.float64), 3) * envelope
    return centred_irfftn(f, 3, box).astype(volume.dtype)
