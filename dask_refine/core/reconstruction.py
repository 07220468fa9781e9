"""Reconstruction from backprojected sums: regularised Fourier division and gridding correction.

Sums are padded centred rffts ``(P, P, P//2+1)`` as accumulated by
:func:`.projection.insert_central_slices_rfft` (numerator Σ s·C·X̂, weights Σ s²·C²).
``V̂ = num / (wgt + λ(shell))`` with ``λ = ⟨wgt⟩_shell / SSNR(shell)``: the Wiener/MAP estimate
of RELION ``BackProjector::reconstruct`` with ``tau2 = SSNR / ⟨wgt⟩`` (``updateSSNRarrays``).
Without an SSNR estimate a constant :data:`DEFAULT_SSNR` gives a small, scale-free regulariser.
"""

from __future__ import annotations

import functools

import numpy as np

from .backend import array_module
from .fourier import centred_irfftn, crop_centred, rfft_multiplicity, rfft_radius
from .masks import soft_mask_outside_map
from .projection import gridding_correction, symmetrize_hermitian_planes

#: SSNR assumed in every shell before an FSC exists (λ = ⟨wgt⟩/1000).
DEFAULT_SSNR = 1000.0


def padded_shell_index(padded_size: int, pad: int, xp=np):
    """Original-box shell ``round(|k_padded| / pad)`` of each padded rfft voxel (int64)."""
    return xp.rint(rfft_radius(padded_size, 3, xp) / pad).astype(xp.int64)


@functools.lru_cache(maxsize=4)
def _numpy_padded_layout(padded_size: int, box_size: int):
    """On NumPy, computed once per grid and shared (read-only): each padded rfft voxel's
    original-box shell (:func:`padded_shell_index`), the voxels of shells 0 … D/2 as flat
    indices with their shells and Hermitian multiplicities, and the shell count of each."""
    pad = padded_size // box_size
    shells = padded_shell_index(padded_size, pad)
    n = box_size // 2 + 1
    keep = np.flatnonzero(shells.ravel() < n)
    kept = shells.ravel()[keep]
    mult = np.broadcast_to(rfft_multiplicity(padded_size, 3), shells.shape).ravel()[keep]
    count = np.bincount(kept, weights=mult, minlength=n)
    within = rfft_radius(padded_size, 3) <= (box_size // 2) * pad
    for a in (shells, keep, kept, mult, count, within):
        a.setflags(write=False)
    return shells, keep, kept, mult, count, within


def shell_mean_weight(weight_sum, box_size: int) -> np.ndarray:
    """Mean of a (Hermitian-completed) padded weight sum over each original shell 0 … D/2."""
    xp = array_module(weight_sum)
    padded = weight_sum.shape[0]
    n = box_size // 2 + 1
    if xp is np:
        _, keep, kept, mult, count, _ = _numpy_padded_layout(padded, box_size)
        total = np.bincount(kept, weights=weight_sum.ravel()[keep] * mult, minlength=n)
        return total / np.maximum(count, 1)
    shells = padded_shell_index(padded, padded // box_size, xp)
    mult = xp.broadcast_to(rfft_multiplicity(padded, 3, xp), shells.shape)
    keep = shells < n
    total = xp.bincount(shells[keep], weights=(weight_sum * mult)[keep], minlength=n)
    count = xp.bincount(shells[keep], weights=mult[keep], minlength=n)
    mean = total / xp.maximum(count, 1)
    return np.asarray(mean.get() if hasattr(mean, "get") else mean, dtype=np.float64)


def reconstruction_denominator(weight_sum, box_size: int, ssnr=None):
    """``wgt + λ(shell)`` on the padded grid, the divisor of :func:`reconstruct` (``inf`` beyond
    radius D/2, where the map is zero), from Hermitian-completed weights. ``ssnr`` as there."""
    xp = array_module(weight_sum)
    padded = weight_sum.shape[0]
    pad = padded // box_size
    n_shells = box_size // 2 + 1
    ssnr = np.full(n_shells, DEFAULT_SSNR) if ssnr is None else np.asarray(ssnr, np.float64)
    mean_w = shell_mean_weight(weight_sum, box_size)
    lam = np.append(mean_w / np.maximum(ssnr[:n_shells], 1e-12), np.inf)  # inf: beyond D/2 → 0
    if xp is np:
        shells, *_, within = _numpy_padded_layout(padded, box_size)
    else:
        shells = padded_shell_index(padded, pad, xp)
        within = rfft_radius(padded, 3, xp) <= (box_size // 2) * pad
    shells = xp.where(within, xp.minimum(shells, n_shells - 1), n_shells)
    return weight_sum + xp.asarray(lam, dtype=weight_sum.dtype)[shells]


def reconstruct(data_sum, weight_sum, box_size: int, ssnr=None, complete_planes: bool = True,
                mask_outside: bool = True):
    """Real volume ``(D, D, D)`` float32 from padded half-space sums.

    ``ssnr``: per-shell spectral SNR ``(D//2 + 1,)`` (e.g. :func:`.fsc.ssnr_from_fsc`), or ``None``
    for :data:`DEFAULT_SSNR`. ``complete_planes``: apply
    :func:`.projection.symmetrize_hermitian_planes` first (leave True for raw insertion sums).
    Steps (RELION ``BackProjector::reconstruct``): complete Hermitian planes, divide by
    ``wgt + ⟨wgt⟩/SSNR`` and keep ``|k| ≤ D/2`` (RELION's ``decenter`` radius), inverse rfft on the
    padded grid, crop to D, replace the corners beyond radius D/2 by the background mean with a
    3-pixel cosine edge (``softMaskOutsideMap``; ``mask_outside=False`` skips it), divide by the
    gridding correction.
    """
    xp = array_module(data_sum)
    padded = data_sum.shape[0]
    pad = padded // box_size
    if complete_planes:
        data_sum = symmetrize_hermitian_planes(data_sum)
        weight_sum = symmetrize_hermitian_planes(weight_sum)
    denom = reconstruction_denominator(weight_sum, box_size, ssnr)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = xp.where(denom > 0, data_sum / xp.where(denom > 0, denom, 1), 0)
    volume = crop_centred(centred_irfftn(ratio, 3, padded), box_size, 3)
    if mask_outside:
        volume = soft_mask_outside_map(volume)
    return (volume / gridding_correction(box_size, pad, xp)).astype(xp.float32)


def fold_out_references(data_folds, weight_folds, box_size: int, ssnr) -> list:
    """One reference per fold, each reconstructed from every fold *but* its own.

    ``data_folds``, ``weight_folds``: ``(F, P, P, P//2+1)`` Hermitian-completed sums of one half
    set split into F ≥ 2 folds; ``ssnr``: the half set's per-shell SSNR (from its FSC). A
    particle of fold f is then aligned against reference f, which it is not part of: the
    reference holds no copy of its own noise (docs/design-notes.md, "Leaving the particle's
    fold out"). Each is regularised with the half map's ``λ(shell) = ⟨wgt⟩/SSNR``: the SSNR
    of a reconstruction grows with the weight it holds, so ``⟨wgt⟩/SSNR`` is the same for the
    half and for any part of it, and the fold-out references are the half map's Wiener filter
    applied to less data.
    """
    data_folds, weight_folds = list(data_folds), list(weight_folds)
    if len(data_folds) < 2:
        raise ValueError(f"fold-out references need at least 2 folds, not {len(data_folds)}")
    half_mean = shell_mean_weight(sum(weight_folds[1:], weight_folds[0]), box_size)
    ssnr = np.asarray(ssnr, np.float64)[:half_mean.size]
    references = []
    for f in range(len(data_folds)):
        # summed from the other folds (not the half less fold f: float rounding would leave
        # a trace of fold f's own data in it)
        rest = [g for g in range(len(data_folds)) if g != f]
        rest_d = sum((data_folds[g] for g in rest[1:]), data_folds[rest[0]])
        rest_w = sum((weight_folds[g] for g in rest[1:]), weight_folds[rest[0]])
        ratio = shell_mean_weight(rest_w, box_size) / np.maximum(half_mean, 1e-30)
        references.append(reconstruct(rest_d, rest_w, box_size, ssnr=ssnr * ratio,
                                      complete_planes=False))
    return references
