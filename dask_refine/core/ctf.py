"""Contrast transfer function, exactly as RELION 3.1 (``src/ctf.h``, ``CTF::getCTF``).

λ[Å] = 12.2643247 / √(V (1 + 0.978466e-6 V)) with V in volts; K1 = πλ, K2 = (π/2) Cs λ³ (Cs in Å),
K3 = atan(Q0 / √(1 − Q0²)), K4 = −B/4, K5 = phase shift (rad);
Δf(θ) = −[(U + V)/2 + (U − V)/2 · cos(2(θ − θ_ast))], γ = K1 Δf u² + K2 u⁴ − K5 − K3,
CTF = −sin(γ) · exp(K4 u²), u in 1/Å.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module
from .fourier import rfft_frequencies


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (RELION's formula)."""
    xp = array_module(voltage_kV)
    volts = xp.asarray(voltage_kV, dtype=xp.float64) * 1e3
    return 12.2643247 / xp.sqrt(volts * (1.0 + volts * 0.978466e-6))


def ctf_2d(freq_x_invA, freq_y_invA, *, defocus_u_A, defocus_v_A, defocus_angle_deg,
           voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg=0.0, bfactor_A2=0.0,
           scale=1.0, gamma_offset=0.0, mag_matrix=None):
    """CTF at spatial frequencies ``(freq_x, freq_y)`` in 1/Å (RELION ``CTF::getCTF``).

    Frequency arrays and the per-particle parameters broadcast against each other; for a batch,
    pass parameters shaped ``(N, 1, 1)``. ``gamma_offset`` (radians) is added to γ: the even
    aberrations (:mod:`.aberrations`). ``mag_matrix`` ``(..., 2, 2)``: the frequencies are
    first multiplied by it (``M k``, anisotropic magnification; for a batch ``(N, 1, 1, 2, 2)``).
    Returns float64 of the broadcast shape.
    """
    xp = array_module(freq_x_invA, freq_y_invA)

    def f64(v):
        return xp.asarray(v, dtype=xp.float64)

    if mag_matrix is not None:
        m = f64(mag_matrix)
        freq_x_invA, freq_y_invA = (m[..., 0, 0] * freq_x_invA + m[..., 0, 1] * freq_y_invA,
                                    m[..., 1, 0] * freq_x_invA + m[..., 1, 1] * freq_y_invA)

    lam = electron_wavelength_A(f64(voltage_kV))
    k1 = np.pi * lam
    k2 = 0.5 * np.pi * (f64(cs_mm) * 1e7) * lam ** 3
    q0 = f64(amplitude_contrast)
    k3 = xp.arctan(q0 / xp.sqrt(1.0 - q0 ** 2))
    k4 = -f64(bfactor_A2) / 4.0
    k5 = xp.deg2rad(f64(phase_shift_deg))
    du, dv = f64(defocus_u_A), f64(defocus_v_A)
    ast = xp.deg2rad(f64(defocus_angle_deg))
    # With cos 2(θ − θ_ast) = cos 2θ cos 2θ_ast + sin 2θ sin 2θ_ast, u² cos 2θ = x² − y² and
    # u² sin 2θ = 2xy, γ is linear in four grid-only terms with per-particle coefficients:
    # γ = a u² + b (x² − y²) + c (2xy) + K2 u⁴ − (K5 + K3)
    x, y = freq_x_invA, freq_y_invA
    u2 = x * x + y * y
    mean_df = -0.5 * (du + dv)
    dev_df = -0.5 * (du - dv)
    gamma = xp.array(xp.broadcast_to((k1 * mean_df) * u2, xp.broadcast_shapes(
        xp.shape(mean_df), xp.shape(u2), xp.shape(ast))), dtype=xp.float64)
    gamma += (k1 * dev_df * xp.cos(2.0 * ast)) * (x * x - y * y)
    gamma += (k1 * dev_df * xp.sin(2.0 * ast)) * (2.0 * x * y)
    gamma += k2 * (u2 * u2)
    gamma -= k5 + k3
    gamma += f64(gamma_offset)
    ctf = xp.sin(gamma, out=gamma)
    ctf *= -f64(scale)
    if bool(xp.any(k4 != 0)):
        ctf *= xp.exp(k4 * u2)
    return ctf


def ctf_rfft(box_size: int, pixel_size_A: float, *, defocus_u_A, defocus_v_A, defocus_angle_deg,
             voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg=0.0, bfactor_A2=0.0,
             gamma_offset=0.0, mag_matrix=None, dtype=np.float32, xp=np):
    """CTFs of a batch of particles on the centred rfft grid: ``(N, D, D//2+1)``.

    Per-particle parameters are 1-D arrays of length N (or scalars, giving ``(1, D, D//2+1)``).
    Matches RELION ``CTF::getFftwImage`` for a square box: frequency (x, y) = (j, i − D/2)/(D·Å).
    """
    ky, kx = rfft_frequencies(box_size, 2, xp)
    fx = kx / (box_size * pixel_size_A)
    fy = ky / (box_size * pixel_size_A)

    def per_particle(v):
        return xp.asarray(v, dtype=xp.float64).reshape(-1, 1, 1)

    params = dict(defocus_u_A=defocus_u_A, defocus_v_A=defocus_v_A,
                  defocus_angle_deg=defocus_angle_deg, voltage_kV=voltage_kV, cs_mm=cs_mm,
                  amplitude_contrast=amplitude_contrast, phase_shift_deg=phase_shift_deg,
                  bfactor_A2=bfactor_A2)
    params = {k: per_particle(v) for k, v in params.items()}
    if mag_matrix is not None:
        params["mag_matrix"] = xp.asarray(mag_matrix, dtype=xp.float64).reshape(-1, 1, 1, 2, 2)
    return ctf_2d(fx[None], fy[None], gamma_offset=xp.asarray(gamma_offset), **params).astype(dtype)
