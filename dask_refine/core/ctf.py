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
           scale=1.0):
    """CTF at spatial frequencies ``(freq_x, freq_y)`` in 1/Å (RELION ``CTF::getCTF``).

    Frequency arrays and the per-particle parameters broadcast against each other; for a batch,
    pass parameters shaped ``(N, 1, 1)``. Returns float64 of the broadcast shape.
    """
    xp = array_module(freq_x_invA, freq_y_invA)

    def f64(v):
        return xp.asarray(v, dtype=xp.float64)

    lam = electron_wavelength_A(f64(voltage_kV))
    k1 = np.pi * lam
    k2 = 0.5 * np.pi * (f64(cs_mm) * 1e7) * lam ** 3
    q0 = f64(amplitude_contrast)
    k3 = xp.arctan(q0 / xp.sqrt(1.0 - q0 ** 2))
    k4 = -f64(bfactor_A2) / 4.0
    k5 = xp.deg2rad(f64(phase_shift_deg))
    du, dv = f64(defocus_u_A), f64(defocus_v_A)
    ast = xp.deg2rad(f64(defocus_angle_deg))
    u2 = freq_x_invA ** 2 + freq_y_invA ** 2
    angle = xp.arctan2(freq_y_invA, freq_x_invA) - ast
    deltaf = -(0.5 * (du + dv) + 0.5 * (du - dv) * xp.cos(2.0 * angle))
    gamma = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -f64(scale) * xp.sin(gamma) * xp.exp(k4 * u2)


def ctf_rfft(box_size: int, pixel_size_A: float, *, defocus_u_A, defocus_v_A, defocus_angle_deg,
             voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg=0.0, bfactor_A2=0.0,
             dtype=np.float32, xp=np):
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
    return ctf_2d(fx[None], fy[None], **params).astype(dtype)
