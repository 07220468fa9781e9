import math

import numpy as np

from dask_refine.core.ctf import ctf_2d, ctf_rfft, electron_wavelength_A


def relion_getctf(x, y, U, V, ang_deg, kV, cs_mm, q0, phase_deg=0.0, bfac=0.0):
    """Literal transcription of RELION 3.1 CTF::initialise + getCTF + getDeltaF (src/ctf.h)."""
    local_Cs = cs_mm * 1e7
    local_kV = kV * 1e3
    rad_azimuth = math.radians(ang_deg)
    defocus_average = -(U + V) * 0.5
    defocus_deviation = -(U - V) * 0.5
    lam = 12.2643247 / math.sqrt(local_kV * (1.0 + local_kV * 0.978466e-6))
    K1 = math.pi / 2 * 2 * lam
    K2 = math.pi / 2 * local_Cs * lam ** 3
    K3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    K4 = -bfac / 4.0
    K5 = math.radians(phase_deg)
    u2 = x * x + y * y
    if abs(x) < 1e-6 and abs(y) < 1e-6:
        deltaf = 0.0
    else:
        ell = math.atan2(y, x) - rad_azimuth
        deltaf = defocus_average + defocus_deviation * math.cos(2 * ell)
    argument = K1 * deltaf * u2 + K2 * u2 * u2 - K5 - K3
    return -math.sin(argument) * math.exp(K4 * u2)


def test_wavelength_known_values():
    assert abs(float(electron_wavelength_A(300.0)) - 0.019687) < 2e-6
    assert abs(float(electron_wavelength_A(200.0)) - 0.025079) < 2e-6


def test_against_relion_formula():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = rng.uniform(-0.3, 0.3, 2)
        U = rng.uniform(5000, 30000)
        V = U - rng.uniform(0, 1500)
        p = dict(U=U, V=V, ang_deg=rng.uniform(0, 180), kV=rng.choice([200, 300]),
                 cs_mm=rng.uniform(0.01, 2.7), q0=rng.uniform(0.05, 0.2),
                 phase_deg=rng.uniform(0, 90), bfac=rng.uniform(-50, 100))
        ours = ctf_2d(np.float64(x), np.float64(y), defocus_u_A=p["U"], defocus_v_A=p["V"],
                      defocus_angle_deg=p["ang_deg"], voltage_kV=p["kV"], cs_mm=p["cs_mm"],
                      amplitude_contrast=p["q0"], phase_shift_deg=p["phase_deg"],
                      bfactor_A2=p["bfac"])
        assert abs(float(ours) - relion_getctf(x, y, **p)) < 1e-9


def test_zero_frequency_is_amplitude_contrast():
    c = ctf_2d(np.float64(0.0), np.float64(0.0), defocus_u_A=15000, defocus_v_A=14000,
               defocus_angle_deg=30, voltage_kV=300, cs_mm=2.7, amplitude_contrast=0.1)
    assert abs(float(c) - 0.1) < 1e-12


def test_rfft_grid_layout():
    box, px = 32, 1.5
    ctf = ctf_rfft(box, px, defocus_u_A=[12000.0, 20000.0], defocus_v_A=[11000.0, 19500.0],
                   defocus_angle_deg=[10.0, 70.0], voltage_kV=[300.0, 300.0], cs_mm=[2.7, 2.7],
                   amplitude_contrast=[0.1, 0.07])
    assert ctf.shape == (2, box, box // 2 + 1) and ctf.dtype == np.float32
    i, j = 5, 7  # row i ↔ ky = i − D/2, column j ↔ kx = j
    expected = relion_getctf(j / (box * px), (i - box // 2) / (box * px), 20000.0, 19500.0, 70.0,
                             300, 2.7, 0.07)
    assert abs(float(ctf[1, i, j]) - expected) < 1e-6
