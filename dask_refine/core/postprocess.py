"""Post-processing of two half maps as RELION's ``relion_postprocess`` (docs/design.md §3,
"Sharpening and local resolution"): the sharpened map and the local resolution.

* **Sharpening** (``Postprocessing::sharpenMap``): the transform of the half maps' average is
  divided by the detector's MTF (when one is given), weighted per shell by
  ``√(2·FSC/(1+FSC))`` (Rosenthal & Henderson 2003; zero from the first shell where the FSC
  falls below 1e-4), and multiplied by ``exp(−(B/4)s²)`` up to Nyquist; B is the slope × 4 of
  the Guinier plot of the FSC-weighted, MTF-corrected map between 10 Å and Nyquist
  (:mod:`.guinier`; RELION's ``--auto_bfac --autob_lowres 10``) unless given. An optional
  low-pass with a raised-cosine edge two shells wide follows (``--low_pass``).
* **Local resolution** (``Postprocessing::run_locres``, ``--locres``): on a grid of points
  ``sampling_A`` apart inside the sphere of radius D/2 − the window's radius, both half maps
  are multiplied by a soft sphere (radius ``sampling_A``/2, a raised-cosine edge
  ``sampling_A`` wide) about the point; their FSC, corrected for the window by phase
  randomisation beyond ``randomize_at_A`` (:func:`.fsc.noise_substituted_fsc`), crosses 0.143
  at the point's resolution (no worse than ``min_resolution_A``). Each voxel's local
  resolution is the window-weighted harmonic mean over the points; the locally filtered map is
  the window-weighted mean of the (MTF-corrected, B-sharpened) average filtered at each point
  by its own FSC weighting and low-pass (on the average's scale; RELION's
  ``_locres_filtered.mrc`` comes out at twice it). One difference from RELION: the window's
  own correlation is measured as the randomised halves' windowed FSC *less* their unwindowed
  one, as the global FSC (:func:`.fsc.mask_corrected_fsc`).

Shells are ``round(|k|)`` as :mod:`.fsc`; maps are real ``(D, D, D)`` arrays (NumPy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .filters import raised_cosine_lowpass
from .fourier import centred_irfftn, centred_rfftn, rfft_radius
from .fsc import (fsc, fsc_of_transforms, noise_substituted_fsc, randomize_phases_beyond,
                  shell_index_table)
from .guinier import GuinierFit, fsc_weights, guinier_bfactor
from .masks import soft_sphere_mask

#: Width of the low-pass filters' raised-cosine edge, in shells (RELION's ``--filter_edge_width``).
FILTER_EDGE_SHELLS = 2.0


@dataclass(frozen=True)
class Mtf:
    """A detector's modulation transfer function: ``value`` at ``frequency_invA`` (ascending),
    linearly interpolated between and held beyond the ends."""

    frequency_invA: np.ndarray
    value: np.ndarray

    def __post_init__(self):
        if np.any(np.asarray(self.value) <= 1e-10):
            raise ValueError("the MTF has zero or negative values")
        if np.any(np.diff(self.frequency_invA) <= 0):
            raise ValueError("the MTF's frequencies do not go up")

    def at(self, frequency_invA):
        return np.interp(frequency_invA, self.frequency_invA, self.value)


def _frequency_invA(box: int, pixel_size_A: float) -> np.ndarray:
    return rfft_radius(box, 3) / (box * pixel_size_A)


def divide_by_mtf(f_rfft, box: int, pixel_size_A: float, mtf: Mtf):
    """RELION ``divideByMtf``: every coefficient up to Nyquist divided by the MTF at its
    frequency (beyond Nyquist unchanged). Returns a new array."""
    s = _frequency_invA(box, pixel_size_A)
    divisor = np.where(s < 0.5 / pixel_size_A, mtf.at(s), 1.0)
    return f_rfft / divisor


def _per_voxel(shell_values, box: int) -> np.ndarray:
    """A per-shell curve ``(D//2 + 1,)`` on the centred rfft grid (0 beyond the last shell)."""
    values = np.append(np.asarray(shell_values, np.float64), 0.0)
    return values[np.minimum(shell_index_table(box, 3), values.size - 1)]


def bfactor_envelope(box: int, pixel_size_A: float, bfactor_A2: float) -> np.ndarray:
    """RELION ``applyBFactorToMap``'s factor on the centred rfft grid: ``exp(−(B/4)s²)`` up to
    Nyquist, 0 beyond."""
    s = _frequency_invA(box, pixel_size_A)
    return np.where(s <= 0.5 / pixel_size_A, np.exp(-(bfactor_A2 / 4.0) * s * s), 0.0)


@dataclass(frozen=True)
class Sharpened:
    """A sharpened map, the B-factor applied (Å², RELION's sign: negative sharpens), the
    Guinier fit of the FSC-weighted MTF-corrected map, the low-pass applied (Å, or None)."""

    map: np.ndarray
    bfactor_A2: float
    guinier: GuinierFit
    lowpass_A: float | None


def sharpen(average, fsc_curve, pixel_size_A: float, bfactor_A2: float | None = None,
            mtf: Mtf | None = None, fit_low_A: float = 10.0, fit_high_A: float | None = None,
            lowpass_A: float | None = None) -> Sharpened:
    """The sharpened map of ``average`` (the half maps' mean) with its half-map FSC (corrected
    for the mask when there is one), as ``relion_postprocess --auto_bfac`` (``bfactor_A2``
    None) or ``--adhoc_bfac B``; see the module's docstring. float32 map."""
    box = average.shape[-1]
    f = centred_rfftn(np.asarray(average, np.float64), 3)
    if mtf is not None:
        f = divide_by_mtf(f, box, pixel_size_A, mtf)
    fit = guinier_bfactor(centred_irfftn(f, 3, box), pixel_size_A, fsc_curve, fit_low_A,
                          fit_high_A)
    applied = (fit.bfactor_A2 or 0.0) if bfactor_A2 is None else float(bfactor_A2)
    f = f * _per_voxel(fsc_weights(fsc_curve), box)
    if applied:
        f = f * bfactor_envelope(box, pixel_size_A, applied)
    if lowpass_A is not None:
        f = f * raised_cosine_lowpass(rfft_radius(box, 3), box * pixel_size_A / lowpass_A,
                                      FILTER_EDGE_SHELLS)
    return Sharpened(centred_irfftn(f, 3, box).astype(np.float32), applied, fit, lowpass_A)


@dataclass(frozen=True)
class LocalResolution:
    """``resolution_A`` per voxel (0 where no window reached), the locally filtered map, and
    each sampling point's centre (voxel offsets from the box centre, (z, y, x)) and
    resolution."""

    resolution_A: np.ndarray
    filtered: np.ndarray
    points: np.ndarray
    point_resolution_A: np.ndarray


def local_resolution(half_a, half_b, pixel_size_A: float, sampling_A: float = 25.0,
                     window_radius_A: float | None = None, edge_width_A: float | None = None,
                     randomize_at_A: float = 25.0, min_resolution_A: float = 50.0,
                     bfactor_A2: float = 0.0, mtf: Mtf | None = None,
                     seed: int = 0) -> LocalResolution:
    """Local resolution and the locally filtered map of two half maps, as
    ``relion_postprocess --locres`` (module docstring); the window's radius defaults to
    ``sampling_A``/2 and its edge to ``sampling_A`` (RELION's defaults); the filtered map is
    sharpened by ``bfactor_A2`` after the MTF division."""
    a = np.asarray(half_a, np.float64)
    b = np.asarray(half_b, np.float64)
    box = a.shape[0]
    def relion_round(x):  # RELION's ROUND: halves away from zero
        return int(np.floor(x + 0.5))

    step = max(1, relion_round(sampling_A / pixel_size_A))
    radius_px = relion_round((0.5 * sampling_A if window_radius_A is None else window_radius_A)
                             / pixel_size_A)
    edge_px = relion_round((sampling_A if edge_width_A is None else edge_width_A) / pixel_size_A)
    randomize_at = int(box * pixel_size_A / randomize_at_A)
    rng = np.random.default_rng(seed)
    rand_a = randomize_phases_beyond(a, randomize_at, rng).astype(np.float32)
    rand_b = randomize_phases_beyond(b, randomize_at, rng).astype(np.float32)
    randomized_unmasked = fsc(rand_a, rand_b)
    # the four maps each window multiplies, one stack: one batched transform per window
    four = np.stack([a.astype(np.float32), b.astype(np.float32), rand_a, rand_b])
    f_sum = centred_rfftn(0.5 * (a + b), 3)
    if mtf is not None:
        f_sum = divide_by_mtf(f_sum, box, pixel_size_A, mtf)
    if bfactor_A2:
        f_sum = f_sum * bfactor_envelope(box, pixel_size_A, bfactor_A2)
    f_sum = f_sum.astype(np.complex64)  # single-precision transforms: 2× faster
    radius = rfft_radius(box, 3)
    filtered = np.zeros_like(a)
    inverse = np.zeros_like(a)
    weight = np.zeros_like(a)
    reach = box // 2 - radius_px
    grid = np.arange(-(box // 2), box - box // 2, step)
    points, resolutions = [], []
    for kk in grid:
        for ii in grid:
            for jj in grid:
                if np.sqrt(kk * kk + ii * ii + jj * jj) >= reach:
                    continue
                window = soft_sphere_mask(box, radius_px, edge_px, centre_px=(kk, ii, jj))
                spectra = centred_rfftn(four * window.astype(np.float32), 3)
                masked = fsc_of_transforms(spectra[0], spectra[1], box)
                randomized = fsc_of_transforms(spectra[2], spectra[3], box)
                for curve in (masked, randomized):  # RELION: an FSC at the origin ≤ 0 is 1
                    curve[0] = curve[0] if curve[0] > 0 else 1.0
                true = noise_substituted_fsc(masked, randomized, randomized_unmasked,
                                             randomize_at)
                below = np.flatnonzero(true < 0.143)
                last = (below[0] - 1) if below.size else true.size - 1
                local = box * pixel_size_A / last if last > 0 else 999.0
                local = min(min_resolution_A, local)
                f = (f_sum * (_per_voxel(fsc_weights(true), box)
                              * raised_cosine_lowpass(radius, box * pixel_size_A / local,
                                                      FILTER_EDGE_SHELLS)).astype(np.float32))
                filtered += window * centred_irfftn(f, 3, box)
                inverse += window / local
                weight += window
                points.append((kk, ii, jj))
                resolutions.append(local)
    reached = weight > 0
    resolution = np.zeros_like(a)
    resolution[reached] = weight[reached] / inverse[reached]
    filtered[reached] /= weight[reached]
    return LocalResolution(resolution.astype(np.float32), filtered.astype(np.float32),
                           np.array(points, np.int64).reshape(-1, 3),
                           np.array(resolutions, np.float64))
