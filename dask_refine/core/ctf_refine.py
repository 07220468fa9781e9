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
* **Anisotropic magnification** (RELION 3.1's magnification fit, the same paper): an image whose
  magnification is off by ``I + D`` (``D`` small) is its prediction sampled at ``(I + D) k``,
  ``X_k ≈ c_k (P_k + ∇P_k · D k)`` with ``c = s C``. Each pixel's least-squares normal
  equations in the displacement ``d = D k`` (``A = Σ w c² Re(∇P̄ ∇Pᵀ)``, ``b = Σ w c
  Re(∇P̄ (X − cP))``) are summed over the particles of an optics group; ``D`` follows from the
  four-parameter system over the band. Only the *anisotropic* part ``[[a, b], [b, −a]]`` is
  fitted: an in-plane rotation is a change of pose, and an isotropic scale (the pixel size) of a
  group's particles is a scale of the map they make.
"""

from __future__ import annotations

import numpy as np

from .aberrations import (
    aberration_frequencies,
    per_particle_zernike,
    zernike_cartesian,
)
from .backend import array_module, to_numpy
from .backprojection import CTF_PARAMETERS, particle_ctfs
from .ctf import ctf_2d, electron_wavelength_A
from .fourier import (
    centred_irfftn,
    centred_rfftn,
    rfft_frequencies,
    rfft_multiplicity,
    rfft_radius,
)

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


def significant(error_drop: float, n_parameters: int, sigmas: float = 4.0) -> bool:
    """Whether fitting ``n_parameters`` lowered the error (−2 log-likelihood) by more than
    noise alone would: under the noise model a fit to nothing lowers it by χ²(k), mean k and
    standard deviation √(2k); accept beyond ``sigmas`` of those above the mean."""
    k = float(n_parameters)
    return error_drop > k + sigmas * np.sqrt(2.0 * k)


def _odd_basis(box_size, pixel_size_A, cs_mm, voltage_kV, mag_matrix, sel, trefoil):
    """Columns of the odd phase per unit parameter at the band pixels ``sel``: the tilt's
    (per mrad) and, with ``trefoil``, RELION's odd coefficients 2 and 5 (Z_3^{−3}, Z_3^{3})."""
    a = tilt_basis(box_size, pixel_size_A, cs_mm, voltage_kV, mag_matrix).reshape(2, -1)[:, sel]
    if not trefoil:
        return a
    kx, ky = aberration_frequencies(box_size, pixel_size_A, mag_matrix)
    kx, ky = kx.ravel()[sel], ky.ravel()[sel]
    return np.vstack([a, zernike_cartesian(3, -3, kx, ky), zernike_cartesian(3, 3, kx, ky)])


def fit_beam_tilt(z, box_size: int, pixel_size_A: float, cs_mm: float, voltage_kV: float,
                  r_max: float, mag_matrix=None, max_tilt_mrad: float = 10.0,
                  iterations: int = 30, trefoil: bool = False) -> np.ndarray:
    """The beam-tilt update ``(δτx, δτy)`` in mrad that explains the phases of ``z``
    (:func:`phase_sums`) over ``0 < |k| < r_max``: the maximum of
    ``Re Σ_k conj(z_k) e^{iα_k·δτ}`` (the likelihood's dependence on the tilt when the images'
    noise is Gaussian and their predictions fixed), first on a 0.25 mrad grid over
    ``±max_tilt_mrad`` (phases may wrap; noisy sums have local maxima), then by Newton steps
    (each at most 0.5 rad at the band's edge, halved until the score rises). With ``trefoil`` the Newton steps also fit RELION's odd coefficients 2 and 5 (Z_3^{∓3},
    rad/Å⁻³), returned after the tilt: ``(δτx, δτy, δc2, δc5)``, the trefoil zero unless it
    lowers the error significantly (:func:`significant`)."""
    sel = band_rfft_mask(box_size, r_max)
    a = _odd_basis(box_size, pixel_size_A, cs_mm, voltage_kV, mag_matrix, sel, trefoil)
    zs = np.asarray(z).ravel()[sel]
    if not np.any(zs != 0):
        return np.zeros(a.shape[0])
    # The particles' origins take up the part of an odd phase that is linear in k (a shift), so
    # the evidence may hold the tilt's phase less its linear part: the fit carries a linear
    # phase as a nuisance (two parameters), and starts from the best point of two grids, one
    # over the tilt's phase and one over its non-linear part only.
    ky, kx = rfft_frequencies(box_size, 2)
    ky, kx = np.broadcast_arrays(ky, kx)
    linear = np.stack([kx.ravel()[sel], ky.ravel()[sel]]).astype(np.float64)
    w, phi = np.abs(zs), np.angle(zs)
    a_rest = a - np.linalg.solve((linear * w) @ linear.T, (linear * w) @ a.T).T @ linear
    grid = np.arange(-max_tilt_mrad, max_tilt_mrad + 1e-9, 0.25)

    def grid_max(basis):
        best, tau = -np.inf, np.zeros(2)
        for tx in grid:  # one row of the grid at a time: (G, M) phases
            phase = tx * basis[0][None, :] + grid[:, None] * basis[1][None, :]
            score = np.real(np.exp(1j * phase) @ np.conj(zs))
            i = int(np.argmax(score))
            if score[i] > best:
                best, tau = score[i], np.array([tx, grid[i]])
        return tau

    # Newton steps in a basis scaled to unit size on the band (the Zernike terms are tiny in
    # 1/Å units), on Σ w cos(b·p − φ), b = the aberrations' columns and the linear phase's
    full = np.vstack([a, linear])
    norm = np.abs(full).max(axis=1)
    b = full / norm[:, None]

    def score(q):
        return float(np.sum(w * np.cos(b.T @ q - phi)))

    def newton(p):
        for _ in range(iterations):
            resid = b.T @ p - phi
            grad = -(b * (w * np.sin(resid))).sum(axis=1)
            hess = -(b * (w * np.cos(resid))) @ b.T
            try:
                step = np.linalg.solve(hess, -grad)
            except np.linalg.LinAlgError:
                break
            if grad @ step <= 0:  # not an ascent direction (the Hessian is not negative here)
                step = 0.1 * grad / max(1e-300, np.abs(grad).max())
            step = np.clip(step, -0.5, 0.5)
            here = score(p)
            while score(p + step) < here and np.abs(step).max() > 1e-12:  # backtrack
                step = 0.5 * step
            p = p + step
            if np.abs(step).max() < 1e-9:
                break
        return p

    starts = []
    for basis, with_linear in ((a, False), (a_rest, True)):
        tau = grid_max(basis)
        p0 = np.zeros(full.shape[0])
        p0[:2] = tau
        if with_linear:  # the linear phase that makes a_rest · τ out of a · τ
            p0[-2:] = -np.linalg.solve((linear * w) @ linear.T, (linear * w) @ a[:2].T) @ tau
        starts.append(newton(p0 * norm))
    p = max(starts, key=score)
    if trefoil:  # keep the trefoil only where the data ask for it (see significant())
        without = p.copy()
        without[2:-2] = 0.0
        if not significant(2.0 * (score(p) - score(without)), 2):
            p = without
    return (p / norm)[:-2]


def even_sums(x_centred, slices, meta: dict, scale, noise_weight, pixel_size_A: float) -> dict:
    """Per-pixel sums ``(D, H)`` over particles for the even-aberration fit (host float64).

    With ``c = −E sin γ`` (the CTF) and ``q = −E cos γ`` (its quadrature), a γ offset δ makes
    the prediction ``s P (c cos δ + q sin δ)``, so each pixel's error is a function of δ
    through ``a = Σ w s c Re(P̄X)``, ``b = Σ w s q Re(P̄X)`` and ``cc, cq, qq = Σ w s² |P|²
    (c², cq, q²)``. Phase-flipped particles are left out (their model is |CTF|)."""
    xp = array_module(x_centred)
    n, box = x_centred.shape[0], x_centred.shape[-2]
    keep = (np.ones(n, bool) if "ctf_phase_flipped" not in meta
            else ~np.asarray(meta["ctf_phase_flipped"], bool))
    rows = np.flatnonzero(keep)
    sub = {k: np.asarray(v)[rows] for k, v in meta.items()}
    c = particle_ctfs(sub, box, pixel_size_A, xp).astype(xp.float64)
    even = np.zeros((rows.size, 1)) if "even_zernike" not in sub else np.asarray(
        sub["even_zernike"], np.float64).reshape(rows.size, -1).copy()
    even[:, 0] += np.pi / 2  # the piston term: γ + π/2
    q = particle_ctfs({**sub, "even_zernike": even}, box, pixel_size_A, xp).astype(xp.float64)
    rows_d = xp.asarray(rows)
    s = xp.asarray(np.asarray(scale, np.float64)[rows]).reshape(-1, 1, 1)
    p, x = slices[rows_d], x_centred[rows_d]
    w = xp.asarray(noise_weight)
    cross = s * xp.real(xp.conj(p) * x)
    power = s * s * xp.abs(p) ** 2
    return {"a": to_numpy((cross * c).sum(axis=0) * w), "b": to_numpy((cross * q).sum(axis=0) * w),
            "cc": to_numpy((power * c * c).sum(axis=0) * w),
            "cq": to_numpy((power * c * q).sum(axis=0) * w),
            "qq": to_numpy((power * q * q).sum(axis=0) * w)}


#: The even terms a group's fit may change, as RELION even coefficients (index → weight): the
#: fourth-order monomials ρ⁴ (C_s), ρ⁴ cos 2φ, ρ⁴ sin 2φ (secondary astigmatism), ρ⁴ cos 4φ,
#: ρ⁴ sin 4φ (tetrafoil). In RELION's unnormalised Zernike basis (ρ in 1/Å, so ρ ≪ 1)
#: Z_4^0 = 6ρ⁴ − 6ρ² + 1 is mostly defocus and piston, which each particle's own defocus
#: already carries; the monomials are what is left: ρ⁴ = Z_4^0/6 + Z_2^0/2 + Z_0^0/3,
#: ρ⁴ cos 2φ = Z_4^2/4 + 3 Z_2^2/4, ρ⁴ sin 2φ = Z_4^{−2}/4 + 3 Z_2^{−2}/4, ρ⁴ cos 4φ = Z_4^4,
#: ρ⁴ sin 4φ = Z_4^{−4}.
EVEN_MONOMIALS = ({6: 1 / 6, 2: 1 / 2, 0: 1 / 3}, {7: 1 / 4, 3: 3 / 4}, {5: 1 / 4, 1: 3 / 4},
                  {8: 1.0}, {4: 1.0})


def fit_even_aberrations(sums: dict, box_size: int, pixel_size_A: float, r_max: float,
                         mag_matrix=None, iterations: int = 20) -> np.ndarray:
    """RELION's 9 even Zernike coefficients (n ≤ 4) of the γ offset
    δ(k) = Σ_j p_j μ_j(Mk) over the fourth-order monomials μ of :data:`EVEN_MONOMIALS` that
    minimises the error of :func:`even_sums` over ``0 < |k| < r_max`` (Newton steps from δ = 0,
    in a basis scaled to unit size on the band; each step at most 0.5 rad at the edge); zero
    unless the fit lowers the error significantly (:func:`significant`)."""
    sel = band_rfft_mask(box_size, r_max)
    m = np.broadcast_to(rfft_multiplicity(box_size, 2), (box_size, box_size // 2 + 1)).ravel()[sel]
    a, b, cc, cq, qq = (np.asarray(sums[k]).ravel()[sel] * m for k in ("a", "b", "cc", "cq", "qq"))
    kx, ky = aberration_frequencies(box_size, pixel_size_A, mag_matrix)
    kx, ky = kx.ravel()[sel], ky.ravel()[sel]
    rho4, phi = (kx * kx + ky * ky) ** 2, np.arctan2(ky, kx)
    basis = np.stack([rho4, rho4 * np.cos(2 * phi), rho4 * np.sin(2 * phi),
                      rho4 * np.cos(4 * phi), rho4 * np.sin(4 * phi)])
    norm = np.abs(basis).max(axis=1)
    basis = basis / norm[:, None]

    def error(q):
        d = q @ basis
        c1, s1 = np.cos(d), np.sin(d)
        return float(np.sum(-2 * (a * c1 + b * s1) + cc * c1 * c1 + 2 * cq * c1 * s1
                            + qq * s1 * s1))

    p = np.zeros(basis.shape[0])
    for _ in range(iterations):
        d = p @ basis
        s1, c1, s2, c2 = np.sin(d), np.cos(d), np.sin(2 * d), np.cos(2 * d)
        g = 2 * a * s1 - 2 * b * c1 + (qq - cc) * s2 + 2 * cq * c2  # dF/dδ per pixel
        h = 2 * a * c1 + 2 * b * s1 + 2 * (qq - cc) * c2 - 4 * cq * s2  # d²F/dδ²
        grad = basis @ g
        hess = (basis * np.maximum(h, 0.0)) @ basis.T
        try:
            step = -np.linalg.solve(hess + 1e-9 * np.trace(hess) / p.size * np.eye(p.size), grad)
        except np.linalg.LinAlgError:
            break
        step = np.clip(step, -0.5, 0.5)
        here = error(p)
        while error(p + step) > here and np.abs(step).max() > 1e-12:  # backtrack
            step = 0.5 * step
        p = p + step
        if np.abs(step).max() < 1e-9:
            break
    if not significant(error(np.zeros_like(p)) - error(p), p.size):
        return np.zeros(9)
    coefficients = np.zeros(9)
    for value, terms in zip(p / norm, EVEN_MONOMIALS):
        for index, weight in terms.items():
            coefficients[index] += value * weight
    return coefficients


def slice_gradients(slices):
    """``(B, 2, D, H)`` the frequency gradients ``∂P/∂kx``, ``∂P/∂ky`` (per Fourier pixel) of
    image rffts ``P (B, D, H)``: ``∂P/∂k_j = FT(−2πi x_j p / D)`` with ``p`` the real image
    they transform and ``x`` its centred pixel coordinates, exact for that band-limited image
    (the projections of a map inside the box vanish at its edges, so nothing wraps)."""
    xp = array_module(slices)
    box = slices.shape[-2]
    images = centred_irfftn(slices, 2, box)
    coord = (xp.arange(box) - box // 2).astype(images.dtype)
    factor = -2j * np.pi / box
    return xp.stack([factor * centred_rfftn(images * coord[None, None, :], 2),
                     factor * centred_rfftn(images * coord[None, :, None], 2)], axis=1)


def magnification_sums(x_centred, slices, ctf_scaled, noise_weight) -> dict:
    """Per-pixel normal equations ``(D, H)`` of the magnification fit summed over particles
    (host float64): ``axx, axy, ayy = Σ w c² Re(∂P̄_i ∂P_j)``, ``bx, by = Σ w c
    Re(∂P̄_i (X − cP))``. ``ctf_scaled``: ``c = s C`` (B, D, H); ``slices``: the predictions
    without CTF (B, D, H), as the search makes them (magnification included)."""
    xp = array_module(x_centred)
    g = slice_gradients(slices)
    c = ctf_scaled  # s C
    w = xp.asarray(noise_weight)
    resid = x_centred - c * slices
    gx, gy = g[:, 0], g[:, 1]
    cc = c * c

    def total(a):
        return to_numpy(a.sum(axis=0) * w).astype(np.float64)

    return {"axx": total(cc * xp.abs(gx) ** 2), "ayy": total(cc * xp.abs(gy) ** 2),
            "axy": total(cc * xp.real(xp.conj(gx) * gy)),
            "bx": total(c * xp.real(xp.conj(gx) * resid)),
            "by": total(c * xp.real(xp.conj(gy) * resid))}


#: The anisotropic magnification ``D = [[a, b], [b, −a]]`` as a map from ``(a, b)`` to
#: ``(D00, D01, D10, D11)``.
ANISOTROPIC_BASIS = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])


def fit_magnification(sums: dict, box_size: int, r_max: float, max_displacement_px: float = 0.5
                      ) -> np.ndarray:
    """The anisotropic distortion ``D (2, 2)`` (``[[a, b], [b, −a]]``) that the sums of
    :func:`magnification_sums` ask for over ``0 < |k| < r_max``: the least-squares solution of
    ``Σ_k m (d·A d − 2 d·b)`` with ``d = D k`` (RELION's ``solveLinearlyFreq``, restricted to
    the anisotropic part), scaled down so that no displacement exceeds ``max_displacement_px``
    at the band's edge (the model is linear in ``D``); zero unless it lowers the error
    significantly (:func:`significant`). The group's matrix becomes ``M (I + D)``."""
    sel = band_rfft_mask(box_size, r_max)
    m = np.broadcast_to(rfft_multiplicity(box_size, 2), (box_size, box_size // 2 + 1)).ravel()[sel]
    axx, axy, ayy, bx, by = (np.asarray(sums[k]).ravel()[sel] * m
                             for k in ("axx", "axy", "ayy", "bx", "by"))
    ky, kx = (np.broadcast_to(f, (box_size, box_size // 2 + 1)).ravel()[sel].astype(np.float64)
              for f in rfft_frequencies(box_size, 2))
    u = np.stack([kx, ky])  # d = (D[0] · u, D[1] · u)
    hxx, hxy, hyy = ((u * a) @ u.T for a in (axx, axy, ayy))
    h = np.block([[hxx, hxy], [hxy, hyy]])
    g = np.concatenate([u @ bx, u @ by])
    t = ANISOTROPIC_BASIS
    ht, gt = t.T @ h @ t, t.T @ g
    try:
        q = np.linalg.solve(ht, gt)
    except np.linalg.LinAlgError:
        return np.zeros((2, 2))
    if not significant(float(q @ gt), q.size):
        return np.zeros((2, 2))
    d = (t @ q).reshape(2, 2)
    largest = r_max * np.linalg.norm(d, 2)
    if largest > max_displacement_px:
        d *= max_displacement_px / largest
    return d
