"""CTF refinement at the refined poses: per-particle defocus and per-optics-group beam tilt
(docs/design.md §3, "CTF refinement").

Both fit the image model of the pose search (docs/design.md §1) with the pose, origin, scale
and reference held at their current values, over the alignment band, under the noise model
(weights w = 1/σ², Hermitian multiplicities m):

* **Defocus** (RELION's CtfRefine ``--fit_defocus``, cryoSPARC's per-particle defocus): one
  offset Δ added to both defocus_U and defocus_V (astigmatism and its angle kept; optionally
  U and V then apart, the astigmatism's angle kept),
  ``E(Δ) = Σ_k m w |X_k − s C_k(Δ) P_k|²`` = const − 2s Σ m w C(Δ) Re(P̄X) + s² Σ m w C(Δ)² |P|²,
  evaluated on a grid of offsets (``step_A``) over ``±range_A`` and refined by the parabola
  through the best grid point and its neighbours.
* **Beam tilt** (RELION 3.1's odd-aberration fit, Zivanov et al. 2020, *IUCrJ* 7, 253): every
  particle adds ``z_k = m w · conj(s C P)_k · X_k`` (images already demodulated by the current
  tilt) to its optics group's sum; where the model is right, arg z_k is the phase left over,
  ``δφ_k = −π·20000·Cs·λ²·(δτx kx + δτy ky)|k|²``. The update δτ maximises
  ``Re Σ_k conj(z_k) e^{iδφ_k(δτ)}``: a grid first (phases may wrap, noisy sums have local
  maxima), then Newton steps.
"""

from __future__ import annotations

import numpy as np

from .aberrations import aberration_frequencies, per_particle_zernike
from .backend import array_module, to_numpy
from .backprojection import CTF_PARAMETERS
from .ctf import ctf_2d, electron_wavelength_A
from .fourier import rfft_multiplicity, rfft_radius

#: Grid spacing of the defocus search, Å.
DEFOCUS_STEP_A = 20.0


def band_rfft_mask(box_size: int, r_max: float):
    """Flat indices of the centred rfft pixels with ``0 < |k| < r_max`` (Fourier pixels)."""
    r = rfft_radius(box_size, 2)
    return np.flatnonzero(((r > 0) & (r < r_max)).ravel())


def defocus_errors(x_centred, slices, meta: dict, scale, noise_weight, pixel_size_A: float,
                   r_max: float, offsets_A, offsets_v_A=None):
    """Errors ``(B, O)`` of each particle with its defocus U and V moved by each offset
    (``offsets_v_A``, the same length: V moved by those instead; astigmatism).

    ``x_centred``: ``(B, D, H)`` observed rffts, demodulated and centred at the particle's
    origin; ``slices``: ``(B, D, H)`` the reference's slices at the poses (no CTF);
    ``meta``: the CTF columns (and optional ``even_zernike``, ``mag_matrix``) of the ``B``
    particles; ``noise_weight`` ``(D, H)``; errors over ``0 < |k| < r_max``. Host arrays.
    """
    box = x_centred.shape[-2]
    sel = band_rfft_mask(box, r_max)
    m = np.broadcast_to(rfft_multiplicity(box, 2), (box, box // 2 + 1))
    mw = m.ravel()[sel] * np.broadcast_to(to_numpy(noise_weight), m.shape).ravel()[sel]
    x = to_numpy(x_centred).reshape(x_centred.shape[0], -1)[:, sel]
    p = to_numpy(slices).reshape(slices.shape[0], -1)[:, sel]
    cross = mw * np.real(np.conj(p) * x)  # (B, M)
    power = mw * np.abs(p) ** 2
    norm_x = np.sum(mw * np.abs(x) ** 2, axis=1)  # (B,)
    du = np.asarray(offsets_A, np.float64)
    dv = du if offsets_v_A is None else np.asarray(offsets_v_A, np.float64)
    ctf = _band_ctfs(meta, box, pixel_size_A, sel, du, dv)
    s = np.asarray(scale, np.float64).reshape(-1, 1)
    return (norm_x[:, None] - 2.0 * s * np.einsum("bom,bm->bo", ctf, cross)
            + s * s * np.einsum("bom,bm->bo", ctf * ctf, power))


def _band_ctfs(meta, box, pixel_size_A, sel, offsets_u, offsets_v):
    """CTFs ``(B, O, M)`` at the band pixels ``sel`` with defocus U and V moved by each pair of
    offsets."""
    n = np.asarray(meta["defocus_u_A"]).shape[0]
    mags = np.asarray(meta["mag_matrix"], np.float64).reshape(n, 2, 2) if "mag_matrix" in meta \
        else np.tile(np.eye(2), (n, 1, 1))
    even = per_particle_zernike(meta, "even_zernike", box, pixel_size_A)
    fx, fy = aberration_frequencies(box, pixel_size_A)
    fx, fy = fx.ravel()[sel], fy.ravel()[sel]
    out = np.empty((n, offsets_u.size, sel.size))
    for b in range(n):
        params = {k: float(np.asarray(meta[k])[b]) for k in CTF_PARAMETERS}
        params["defocus_u_A"] = params["defocus_u_A"] + offsets_u[:, None]
        params["defocus_v_A"] = params["defocus_v_A"] + offsets_v[:, None]
        out[b] = ctf_2d(fx[None, :], fy[None, :], mag_matrix=mags[b],
                        gamma_offset=0.0 if even is None else even[b].ravel()[sel][None, :],
                        **params)
        if "ctf_phase_flipped" in meta and np.asarray(meta["ctf_phase_flipped"])[b]:
            out[b] = np.abs(out[b])
    return out


def refine_defocus(x_centred, slices, meta: dict, scale, noise_weight, pixel_size_A: float,
                   r_max: float, range_A: float, step_A: float = DEFOCUS_STEP_A,
                   astigmatism: bool = False) -> np.ndarray:
    """Per-particle defocus offsets ``(B, 2)`` in Å (U, V) that minimise
    :func:`defocus_errors`: one offset for both within ``[−range_A, range_A]``, the best of a
    grid of ``step_A`` refined by the vertex of the parabola through it and its neighbours
    (clamped to the range). With ``astigmatism`` U and V then move apart: a 50 Å grid over
    ±300 Å about that offset, then a 10 Å grid over ±50 Å about its best."""
    n_steps = max(1, int(round(range_A / step_A)))
    grid = np.linspace(-n_steps * step_A, n_steps * step_A, 2 * n_steps + 1)
    args = (x_centred, slices, meta, scale, noise_weight, pixel_size_A, r_max)
    errors = defocus_errors(*args, grid)
    best = np.argmin(errors, axis=1)
    common = grid[best].copy()
    inner = (best > 0) & (best < grid.size - 1)
    rows = np.flatnonzero(inner)
    e_m, e_0, e_p = (errors[rows, best[rows] + d] for d in (-1, 0, 1))
    curvature = e_m - 2.0 * e_0 + e_p
    ok = curvature > 0
    common[rows[ok]] += 0.5 * step_A * (e_m[ok] - e_p[ok]) / curvature[ok]
    out = np.repeat(np.clip(common, -range_A, range_A)[:, None], 2, axis=1)
    if not astigmatism:
        return out
    for half_width, step in ((300.0, 50.0), (50.0, 10.0)):
        d = np.arange(-half_width, half_width + 1e-9, step)
        du, dv = (g.ravel() for g in np.meshgrid(d, d, indexing="ij"))
        for b in range(out.shape[0]):  # each particle about its own centre
            one = (x_centred[b:b + 1], slices[b:b + 1], {k: np.asarray(v)[b:b + 1]
                                                          for k, v in meta.items()},
                   np.asarray(scale)[b:b + 1], noise_weight, pixel_size_A, r_max)
            e = defocus_errors(*one, out[b, 0] + du, out[b, 1] + dv)[0]
            i = int(np.argmin(e))
            out[b] = np.clip(out[b] + [du[i], dv[i]], -range_A, range_A)
    return out


def tilt_basis(box_size: int, pixel_size_A: float, cs_mm: float, voltage_kV: float,
               mag_matrix=None):
    """``(2, D, H)`` ∂φ/∂τx and ∂φ/∂τy (radians per mrad) of the beam-tilt phase
    ``φ = −π·20000·Cs·λ²·(τx kx + τy ky)|k|²`` on the centred rfft grid (at ``M k``)."""
    kx, ky = aberration_frequencies(box_size, pixel_size_A, mag_matrix)
    lam = float(electron_wavelength_A(float(voltage_kV)))
    c = -np.pi * 20000.0 * float(cs_mm) * lam * lam * (kx * kx + ky * ky)
    return np.stack([c * kx, c * ky])


def phase_sums(x_centred, predictions, noise_weight):
    """``z = m w · conj(pred) · X`` summed over particles: ``(D, H)`` complex (host), the
    evidence for a phase left in the images. ``predictions`` include the scale and the CTF."""
    xp = array_module(x_centred)
    box = x_centred.shape[-2]
    m = xp.asarray(rfft_multiplicity(box, 2))
    z = (xp.conj(predictions) * x_centred).sum(axis=0) * m * xp.asarray(noise_weight)
    return to_numpy(z).astype(np.complex128)


def fit_beam_tilt(z, box_size: int, pixel_size_A: float, cs_mm: float, voltage_kV: float,
                  r_max: float, mag_matrix=None, max_tilt_mrad: float = 10.0,
                  iterations: int = 10) -> np.ndarray:
    """The beam-tilt update ``(δτx, δτy)`` in mrad that explains the phases of ``z``
    (:func:`phase_sums`) over ``0 < |k| < r_max``: the maximum of
    ``Re Σ_k conj(z_k) e^{iα_k·δτ}`` (the likelihood's dependence on the tilt when the images'
    noise is Gaussian and their predictions fixed), first on a 0.25 mrad grid over
    ``±max_tilt_mrad`` (phases may wrap; noisy sums have local maxima), then by Newton steps."""
    sel = band_rfft_mask(box_size, r_max)
    a = tilt_basis(box_size, pixel_size_A, cs_mm, voltage_kV, mag_matrix).reshape(2, -1)[:, sel]
    zs = np.asarray(z).ravel()[sel]
    if not np.any(zs != 0):
        return np.zeros(2)
    grid = np.arange(-max_tilt_mrad, max_tilt_mrad + 1e-9, 0.25)
    best, tau = -np.inf, np.zeros(2)
    for tx in grid:  # one row of the grid at a time: (G, M) phases
        phase = tx * a[0][None, :] + grid[:, None] * a[1][None, :]
        score = np.real(np.exp(1j * phase) @ np.conj(zs))
        i = int(np.argmax(score))
        if score[i] > best:
            best, tau = score[i], np.array([tx, grid[i]])
    w, phi = np.abs(zs), np.angle(zs)
    for _ in range(iterations):  # maximise Σ w cos(α·τ − φ)
        resid = a.T @ tau - phi
        grad = -(a * (w * np.sin(resid))).sum(axis=1)
        hess = -(a * (w * np.cos(resid))) @ a.T
        try:
            step = np.linalg.solve(hess, -grad)
        except np.linalg.LinAlgError:
            break
        if np.abs(step).max() > 0.5:  # stay at the grid's maximum
            break
        tau = tau + step
        if np.abs(step).max() < 1e-6:
            break
    return tau
