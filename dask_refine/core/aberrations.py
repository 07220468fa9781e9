"""Optical aberrations beyond the CTF fit, exactly as RELION 3.1 applies them (docs/design.md §2).

RELION's observation model (``src/jaz/obs_model.cpp``) carries, per optics group:

* **odd** Zernike coefficients (antisymmetric aberrations: beam tilt, coma, trefoil). They phase
  the prediction: ``prediction = e^{iφ(k)} · CTF · slice``, ``φ = Σ_i c_i Z_i(M k)``. RELION
  removes them from the *observation* instead (``demodulatePhase``): ``X̂ ← e^{−iφ} X̂``, so the
  rest of the model keeps a real CTF. Phase factors have unit modulus, so noise statistics are
  unchanged; we do the same (:func:`demodulate`).
* **even** Zernike coefficients (symmetric: defocus, astigmatism, Cs and tetrafoil corrections)
  add ``Σ_i c_i Z_i(M k)`` to the CTF's argument γ (``getGammaOffset``).
* the 2×2 **magnification** matrix ``M``: the CTF, both aberrations and the reference's
  slice are evaluated at ``M k`` (RELION slices with ``(M₃⁻¹ A)⁻¹``, ``applyAnisoMag``,
  ``M₃`` = M bordered by a 1; :func:`magnified_rotations`).
* a **beam tilt** ``(τx, τy)`` in mrad becomes odd coefficients (``TiltHelper::insertTilt``):
  ``φ = −π · 20000 · Cs[mm] · λ² · (τx kx + τy ky) · |k|²``.

Zernike polynomials follow RELION's ``src/jaz/math/Zernike.cpp``: Cartesian arguments in 1/Å
(no normalisation radius), ``Z(m ≥ 0) = R_n^m(ρ) cos mφ``, ``Z(m < 0) = R_n^{|m|}(ρ) sin |m|φ``,
and RELION's single indices: odd ``i → (n, m)`` = (1, −1), (1, 1), (3, −3), (3, −1), (3, 1),
(3, 3), …; even ``i → (n, m)`` = (0, 0), (2, −2), (2, 0), (2, 2), (4, −4), …

Per-particle metadata (names of docs/design.md §2): ``odd_zernike (N, C_odd)``,
``even_zernike (N, C_even)`` and ``mag_matrix (N, 2, 2)``; each is optional, absent meaning
no such aberration. ``ctf_phase_flipped (N,)`` bool: the images were multiplied by the CTF's
sign (RELION's ``rlnCtfDataArePhaseFlipped``), so their model's CTF is |CTF|.
"""

from __future__ import annotations

from math import factorial

import numpy as np

from .backend import array_module
from .ctf import electron_wavelength_A
from .fourier import rfft_frequencies

ABERRATION_PARAMETERS = ("odd_zernike", "even_zernike", "mag_matrix", "ctf_phase_flipped")


def odd_zernike_nm(index: int) -> tuple[int, int]:
    """RELION's odd single index → ``(n, m)`` (``Zernike::oddIndexToMN``)."""
    k = int((np.sqrt(1 + 4 * index) - 1.0) / 2.0)
    n = 2 * k + 1
    return n, 2 * (index - (k * k + k)) - n


def even_zernike_nm(index: int) -> tuple[int, int]:
    """RELION's even single index → ``(n, m)`` (``Zernike::evenIndexToMN``)."""
    k = int(np.sqrt(index))
    return 2 * k, 2 * (index - k * k - k)


def zernike_cartesian(n: int, m: int, x, y):
    """Zernike polynomial ``Z_n^m`` at Cartesian ``(x, y)`` with no normalisation radius."""
    xp = array_module(x, y)
    rho = xp.sqrt(x * x + y * y)
    phi = xp.arctan2(y, x)
    am = abs(m)
    radial = xp.zeros_like(rho)
    if (n - am) % 2 == 0:
        for k in range((n - am) // 2 + 1):
            c = ((-1) ** k * factorial(n - k)
                 / (factorial(k) * factorial((n + am) // 2 - k) * factorial((n - am) // 2 - k)))
            radial = radial + c * rho ** (n - 2 * k)
    return radial * (xp.cos(am * phi) if m >= 0 else xp.sin(am * phi))


def beam_tilt_odd_zernike(tilt_x_mrad, tilt_y_mrad, cs_mm, voltage_kV, odd_zernike=()):
    """Odd coefficients with a beam tilt folded in, as ``TiltHelper::insertTilt`` does.

    ``φ = −π·20000·Cs·λ²·(τx kx + τy ky)|k|²`` is ``3 Z3 ρ² (x or y)`` = ``Z3·Z_3^{±1} + 2 Z3·Z_1^{±1}``
    with ``Z3 = −π·20000·Cs·λ²·τ/3``. Like RELION, the tilt is *added* to coefficients 0 and 1
    and *replaces* coefficients 3 and 4. Returns float64 with at least 6 coefficients.
    """
    c = np.zeros(max(6, len(odd_zernike)))
    c[:len(odd_zernike)] = odd_zernike
    lam = float(electron_wavelength_A(float(voltage_kV)))
    scale = float(cs_mm) * 20000.0 * lam * lam * 3.141592654
    z3x = -scale * float(tilt_x_mrad) / 3.0
    z3y = -scale * float(tilt_y_mrad) / 3.0
    c[1] += 2.0 * z3x
    c[0] += 2.0 * z3y
    c[4] = z3x
    c[3] = z3y
    return c


def odd_zernike_with_tilt(odd_zernike, beam_tilt_mrad, cs_mm, voltage_kV) -> np.ndarray:
    """Per-particle odd coefficients ``(N, C ≥ 6)`` with each particle's beam tilt
    ``(N, 2)`` folded in (:func:`beam_tilt_odd_zernike`); either input may be None."""
    cs = np.atleast_1d(np.asarray(cs_mm, np.float64))
    odd = (np.zeros((cs.size, 0)) if odd_zernike is None
           else np.asarray(odd_zernike, np.float64).reshape(cs.size, -1))
    if beam_tilt_mrad is None:
        return odd
    tilt = np.asarray(beam_tilt_mrad, np.float64).reshape(cs.size, 2)
    volts = np.broadcast_to(np.asarray(voltage_kV, np.float64), cs.shape)
    out = np.zeros((cs.size, max(6, odd.shape[1])))
    for key in np.unique(np.column_stack([odd, tilt, cs, volts]), axis=0):
        rows = np.all(np.column_stack([odd, tilt, cs, volts]) == key, axis=1)
        out[rows] = beam_tilt_odd_zernike(key[odd.shape[1]], key[odd.shape[1] + 1],
                                          key[-2], key[-1], key[:odd.shape[1]])
    return out


def model_aberrations(columns: dict, pixel_size_A: float | None = None) -> dict:
    """The image model's aberration columns from the stored ones (``beam_tilt_mrad``,
    ``odd_zernike``, ``even_zernike``, ``mag_matrix``, ``image_pixel_size_A``, with ``cs_mm``
    and ``voltage_kV``): odd coefficients with the tilt folded in, even coefficients,
    magnification; each only where it is present and not zero (identity for the matrix).

    Optics groups imaged at another pixel size than the reference's (``pixel_size_A``, the
    store's) are a magnification, as RELION's ``applyScaleDifference``: image frequency ``k``
    of a particle at pixel size ``p`` is the reference's ``(pixel_size_A / p) k`` (same box),
    so the model's matrix is ``(pixel_size_A / p) M`` and the CTF, taken at that frequency
    over ``pixel_size_A``, is the particle's own. The particle's ``image_pixel_size_A`` is then
    kept in the model too: its origins convert to pixels by it (:func:`image_pixel_sizes`)."""
    out = {}
    mag = columns.get("mag_matrix")
    image_px = columns.get("image_pixel_size_A")
    if image_px is not None and pixel_size_A is not None:
        ratio = float(pixel_size_A) / np.asarray(image_px, np.float64).ravel()
        if np.any(np.abs(ratio - 1.0) > 1e-9):
            base = (np.tile(np.eye(2), (ratio.size, 1, 1)) if mag is None
                    else np.asarray(mag, np.float64).reshape(-1, 2, 2))
            mag = base * ratio[:, None, None]
            out["image_pixel_size_A"] = np.asarray(image_px, np.float64).ravel()
    if "beam_tilt_mrad" in columns or "odd_zernike" in columns:
        odd = odd_zernike_with_tilt(columns.get("odd_zernike"), columns.get("beam_tilt_mrad"),
                                    columns["cs_mm"], columns["voltage_kV"])
        if np.any(odd != 0):
            out["odd_zernike"] = odd
    even = columns.get("even_zernike")
    if even is not None and np.any(np.asarray(even) != 0):
        out["even_zernike"] = np.asarray(even, np.float64)
    if mag is not None and np.any(np.asarray(mag, np.float64).reshape(-1, 4)
                                  != [1.0, 0.0, 0.0, 1.0]):
        out["mag_matrix"] = np.asarray(mag, np.float64)
    flipped = columns.get("ctf_phase_flipped")
    if flipped is not None and np.any(np.asarray(flipped) != 0):
        out["ctf_phase_flipped"] = np.asarray(flipped) != 0
    return out


def image_pixel_sizes(meta: dict, pixel_size_A: float, n: int) -> np.ndarray:
    """``(n,)`` each particle's image pixel size: its optics group's where the model carries
    one (:func:`model_aberrations`), else ``pixel_size_A``."""
    if "image_pixel_size_A" in meta:
        return np.asarray(meta["image_pixel_size_A"], np.float64).ravel()
    return np.full(n, float(pixel_size_A))


def aberration_frequencies(box_size: int, pixel_size_A: float, mag_matrix=None, xp=np):
    """Spatial frequencies ``(x, y)`` in 1/Å of the centred rfft grid ``(D, D//2+1)``, each
    multiplied by the 2×2 ``mag_matrix`` (``M k``) when one is given."""
    ky, kx = rfft_frequencies(box_size, 2, xp)
    ky, kx = xp.broadcast_arrays(ky / (box_size * pixel_size_A), kx / (box_size * pixel_size_A))
    if mag_matrix is None:
        return kx.astype(xp.float64), ky.astype(xp.float64)
    m = np.asarray(mag_matrix, dtype=np.float64).reshape(2, 2)
    return m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky


def zernike_sum_rfft(coefficients, box_size: int, pixel_size_A: float, odd: bool,
                     mag_matrix=None, xp=np):
    """``Σ_i c_i Z_i(M k)`` on the centred rfft grid ``(D, D//2+1)``, float64 (RELION's
    ``getPhaseCorrection`` phase for odd coefficients, ``getGammaOffset`` for even ones)."""
    x, y = aberration_frequencies(box_size, pixel_size_A, mag_matrix, xp)
    out = xp.zeros(x.shape, dtype=xp.float64)
    to_nm = odd_zernike_nm if odd else even_zernike_nm
    for i, c in enumerate(np.asarray(coefficients, dtype=np.float64).ravel()):
        if c != 0.0:
            n, m = to_nm(i)
            out += c * zernike_cartesian(n, m, x, y)
    return out


def per_particle_zernike(meta: dict, name: str, box_size: int, pixel_size_A: float, xp=np):
    """``(N, D, D//2+1)`` sums of the per-particle coefficients ``meta[name]`` (``odd_zernike`` or
    ``even_zernike``) with each particle's ``mag_matrix``, or None when ``name`` is absent.
    Computed once per distinct (coefficients, matrix) row: optics groups share them."""
    if name not in meta:
        return None
    coeffs = np.asarray(meta[name], dtype=np.float64)
    coeffs = coeffs.reshape(coeffs.shape[0], -1)
    n = coeffs.shape[0]
    mags = (np.asarray(meta["mag_matrix"], dtype=np.float64).reshape(n, 4)
            if "mag_matrix" in meta else np.tile([1.0, 0.0, 0.0, 1.0], (n, 1)))
    rows, inverse = np.unique(np.hstack([coeffs, mags]), axis=0, return_inverse=True)
    tables = xp.stack([zernike_sum_rfft(r[:-4], box_size, pixel_size_A, name == "odd_zernike",
                                        r[-4:], xp) for r in rows])
    return tables[xp.asarray(inverse.ravel())]


def demodulate(f_rfft, meta: dict, pixel_size_A: float):
    """Remove the odd aberrations' phase from observed rffts ``(N, D, D//2+1)``: ``e^{−iφ} X̂``
    (RELION ``demodulatePhase``). Returns ``f_rfft`` itself when ``meta`` has no
    ``odd_zernike``."""
    xp = array_module(f_rfft)
    phase = per_particle_zernike(meta, "odd_zernike", f_rfft.shape[-2], pixel_size_A, xp)
    if phase is None:
        return f_rfft
    return (f_rfft * xp.exp(-1j * phase)).astype(f_rfft.dtype)


def modulate(f_rfft, meta: dict, pixel_size_A: float):
    """Apply the odd aberrations' phase to predicted rffts: ``e^{iφ} F`` (the forward model of
    simulation; the inverse of :func:`demodulate`)."""
    xp = array_module(f_rfft)
    phase = per_particle_zernike(meta, "odd_zernike", f_rfft.shape[-2], pixel_size_A, xp)
    if phase is None:
        return f_rfft
    return (f_rfft * xp.exp(1j * phase)).astype(f_rfft.dtype)


def magnified_rotations(rotations, meta: dict):
    """The slicing matrices ``S = M₃ᵀ A`` of poses ``A (N, 3, 3)`` under each particle's
    ``mag_matrix``, or ``rotations`` unchanged without one.

    RELION replaces the pose by ``A' = M₃⁻¹ A`` (``applyAnisoMag``) and its projector samples
    the map at ``A'⁻¹ (k, 0) = Aᵀ M₃ (k, 0) = Aᵀ (M k, 0)``: the slice, like the CTF, is taken
    at the magnified frequency. Our projector samples at ``Sᵀ (k, 0)`` (docs/design.md §2),
    hence ``S = M₃ᵀ A``."""
    if "mag_matrix" not in meta:
        return rotations
    xp = array_module(rotations)
    m = np.asarray(meta["mag_matrix"], dtype=np.float64).reshape(-1, 2, 2)
    m3 = np.tile(np.eye(3), (m.shape[0], 1, 1))
    m3[:, :2, :2] = m
    return xp.matmul(xp.asarray(np.transpose(m3, (0, 2, 1))),
                     xp.asarray(rotations, dtype=xp.float64))
