"""Fourier shell correlation and resolution (shells one Fourier pixel wide, as RELION).

Shell ``i`` holds the rfft coefficients with ``round(|k|) == i`` (k in Fourier pixels), i = 0 … D/2.
Frequency of shell i: ``i / (D · pixel_size_A)`` 1/Å; resolution ``D · pixel_size_A / i`` Å.
"""

from __future__ import annotations

import functools

import numpy as np

from .backend import array_module, to_numpy
from .fourier import centred_irfftn, centred_rfftn, rfft_multiplicity, rfft_radius


def shell_index(box_size: int, ndim: int, xp=np):
    """Shell index ``round(|k|)`` of every centred-rfft coefficient (int64)."""
    return xp.rint(rfft_radius(box_size, ndim, xp)).astype(xp.int64)


def shell_sums(values_rfft, box_size: int, ndim: int, n_shells: int | None = None) -> np.ndarray:
    """Sum of a real quantity on the centred rfft grid over each shell, counting Hermitian pairs.

    Returns float64 ``(n_shells,)`` (default ``D // 2 + 1``); coefficients beyond are dropped.
    """
    xp = array_module(values_rfft)
    n_shells = box_size // 2 + 1 if n_shells is None else n_shells
    if xp is np:  # the grid's shells, computed once per box (FSCs of windows call this often)
        shells, keep = _numpy_shells(box_size, ndim, n_shells)
    else:
        shells = shell_index(box_size, ndim, xp)
        keep = shells < n_shells
        shells = shells[keep]
    mult = rfft_multiplicity(box_size, ndim, xp)
    sums = xp.bincount(shells, weights=(values_rfft * mult)[keep], minlength=n_shells)
    return to_numpy(sums).astype(np.float64)


@functools.lru_cache(maxsize=16)
def shell_index_table(box_size: int, ndim: int) -> np.ndarray:
    """:func:`shell_index` on NumPy, computed once per box and shared: read-only."""
    shells = shell_index(box_size, ndim)
    shells.setflags(write=False)
    return shells


@functools.lru_cache(maxsize=16)
def _numpy_shells(box_size: int, ndim: int, n_shells: int):
    """(shell index of each kept coefficient, the keep mask) on the centred rfft grid: the
    coefficients with ``round(|k|) < n_shells``; read-only, shared between calls."""
    shells = shell_index_table(box_size, ndim)
    keep = shells < n_shells
    kept = shells[keep]
    for a in (kept, keep):
        a.setflags(write=False)
    return kept, keep


def fsc(map_a, map_b) -> np.ndarray:
    """FSC between two real volumes ``(D, D, D)``: float64 ``(D//2 + 1,)``, shell 0 … D/2.

    ``FSC_i = Σ Re(F_a F_b*) / √(Σ|F_a|² Σ|F_b|²)`` over shell i. Shells with no power give 0.
    """
    box = map_a.shape[-1]
    return fsc_of_transforms(centred_rfftn(map_a, 3), centred_rfftn(map_b, 3), box)


def fsc_of_transforms(fa, fb, box_size: int) -> np.ndarray:
    """:func:`fsc` of two maps given their centred rffts ``(D, D, D//2+1)`` complex."""
    box = box_size
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


def within_band(fsc_curve, max_shell: float | None) -> np.ndarray:
    """The curve with shells ``≥ max_shell`` set to 0: where no Fourier data were inserted
    (a band-limited reconstruction) the half maps hold only what a real-space mask leaks into
    the empty shells, a correlation that is not the data's. ``None``: unchanged."""
    curve = np.array(fsc_curve, dtype=np.float64)
    if max_shell is not None:
        curve[np.arange(curve.size) >= max_shell] = 0.0
    return curve


def ssnr_from_fsc(fsc_curve, full_map: bool = False) -> np.ndarray:
    """Spectral SNR per shell from a half-map FSC, as RELION ``MlOptimiser::updateSSNRarrays``.

    The FSC is floored at 0.001. Half map: ``c = FSC``. Full map (both halves): ``c`` is the
    FSC of the full map to the truth, ``√(2·FSC / (1 + FSC))`` (Rosenthal & Henderson 2003,
    RELION's ``is_whole_instead_of_half``). ``c`` is capped at 0.999 and ``SSNR = c / (1 − c)``.
    """
    c = np.maximum(np.asarray(fsc_curve, dtype=np.float64), 0.001)
    if full_map:
        c = np.sqrt(2.0 * c / (1.0 + c))
    c = np.minimum(c, 0.999)
    return c / (1.0 - c)


def randomize_phases_beyond(volume, shell: int, rng: np.random.Generator) -> np.ndarray:
    """Copy of a real volume with the phases of every coefficient at ``|k| ≥ shell`` replaced
    by uniform random ones, amplitudes kept (RELION ``randomizePhasesBeyond``). The phases are
    those of the transform of real white noise, so they respect Hermitian symmetry on the
    kx = 0 plane and the amplitudes survive the inverse transform exactly."""
    box = volume.shape[0]
    f = centred_rfftn(np.asarray(volume, np.float64), 3)
    outer = rfft_radius(box, 3) >= shell
    noise = centred_rfftn(rng.standard_normal(volume.shape), 3)
    f[outer] = np.abs(f[outer]) * np.exp(1j * np.angle(noise[outer]))
    return centred_irfftn(f, 3, box)


def mask_corrected_fsc(half_a, half_b, mask, randomize_below_fsc: float = 0.8,
                       randomize_at_shell: int | None = None, seed: int = 0) -> dict:
    """FSC curves of two half maps with a mask, corrected for the mask's own correlation by
    high-resolution noise substitution (Chen et al. 2013; RELION ``postprocess``).

    Phases are randomised beyond the first shell where the unmasked FSC drops below
    ``randomize_below_fsc`` (or from ``randomize_at_shell``), independently in each half.
    The mask-induced correlation is ``FSC(randomised halves × mask) − FSC(randomised halves)``:
    subtracting the unmasked randomised FSC (zero in expectation) cancels the noise of the single
    randomisation, so a mask of ones gives exactly the unmasked curve. Beyond two shells past the
    randomisation, ``corrected = (masked − induced) / (1 − induced)``; below, ``masked``.
    Returns ``unmasked``, ``masked``, ``randomized_masked``, ``corrected`` (float64 curves) and
    ``randomize_at_shell``.
    """
    unmasked = fsc(half_a, half_b)
    masked = fsc(half_a * mask, half_b * mask)
    if randomize_at_shell is None:
        below = np.flatnonzero((np.arange(unmasked.size) > 0) & (unmasked < randomize_below_fsc))
        randomize_at_shell = int(below[0]) if below.size else unmasked.size
    rng = np.random.default_rng(seed)
    rand_a = randomize_phases_beyond(half_a, randomize_at_shell, rng)
    rand_b = randomize_phases_beyond(half_b, randomize_at_shell, rng)
    randomized_masked = fsc(rand_a * mask, rand_b * mask)
    corrected = noise_substituted_fsc(masked, randomized_masked, fsc(rand_a, rand_b),
                                      randomize_at_shell)
    return {"unmasked": unmasked, "masked": masked, "randomized_masked": randomized_masked,
            "corrected": corrected, "randomize_at_shell": int(randomize_at_shell)}


def noise_substituted_fsc(masked, randomized_masked, randomized_unmasked,
                          randomize_at_shell: int) -> np.ndarray:
    """The masked FSC corrected for the mask's own correlation (:func:`mask_corrected_fsc`):
    ``(masked − induced) / (1 − induced)`` from two shells past ``randomize_at_shell`` on, with
    ``induced = randomized_masked − randomized_unmasked``; ``masked`` below."""
    induced = np.asarray(randomized_masked) - np.asarray(randomized_unmasked)
    corrected = np.array(masked, dtype=np.float64)
    beyond = np.arange(corrected.size) >= randomize_at_shell + 2
    with np.errstate(divide="ignore", invalid="ignore"):
        corrected[beyond] = ((corrected[beyond] - induced[beyond])
                             / np.maximum(1.0 - induced[beyond], 1e-6))
    return corrected
