"""Numba CPU kernels for trilinear slice insertion and extraction (the CPU hot loops).

Same arithmetic as the NumPy reference in :mod:`.projection` (see its docstring for the
conventions); tests check that both agree. Loaded lazily by :mod:`.backend` when Numba is
installed; ``nogil`` so threaded Dask workers run them in parallel.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath=False)
def _corner(r, kx, ky, pad):
    """Point pad·Aᵀ(kx, ky, 0), mirrored to x ≥ 0: (mirrored, x0, y0, z0, fx, fy, fz)."""
    px = (kx * r[0, 0] + ky * r[1, 0]) * pad
    py = (kx * r[0, 1] + ky * r[1, 1]) * pad
    pz = (kx * r[0, 2] + ky * r[1, 2]) * pad
    mirrored = px < 0.0
    if mirrored:
        px, py, pz = -px, -py, -pz
    x0 = int(math.floor(px))
    y0 = int(math.floor(py))
    z0 = int(math.floor(pz))
    return mirrored, x0, y0, z0, px - x0, py - y0, pz - z0


@numba.njit(nogil=True, cache=True, fastmath=False)
def _footprint(x0, y0, z0, fx, fy, fz, p, half, zi, yi, xi, w):
    """The 8 trilinear corners (indices wrapped on z/y) and weights, written into zi, yi, xi, w."""
    c = 0
    for dz in range(2):
        wz = fz if dz else 1.0 - fz
        for dy in range(2):
            wy = fy if dy else 1.0 - fy
            for dx in range(2):
                zi[c] = (z0 + dz + half) % p
                yi[c] = (y0 + dy + half) % p
                xi[c] = x0 + dx
                w[c] = wz * wy * (fx if dx else 1.0 - fx)
                c += 1


@numba.njit(nogil=True, cache=True, fastmath=False)
def insert_slices(data, weights, rotations, kx, ky, pix, pad, data_sum, weight_sum,
                  use_weights):
    """data (N, D·(D//2+1)) complex; weights same shape real; rotations (N, 3, 3) float64;
    kx, ky (M,) frequencies of the used pixels and ``pix`` (M,) their flat indices;
    data_sum / weight_sum (P, P, P//2+1) accumulated in place."""
    n = data.shape[0]
    m = pix.shape[0]
    p = data_sum.shape[0]
    h = data_sum.shape[2]
    half = p // 2
    zi, yi, xi = np.empty(8, np.int64), np.empty(8, np.int64), np.empty(8, np.int64)
    w = np.empty(8)
    for i in range(n):
        r = rotations[i]
        for j in range(m):
            mirrored, x0, y0, z0, fx, fy, fz = _corner(r, kx[j], ky[j], pad)
            val = data[i, pix[j]]
            w0 = weights[i, pix[j]] if use_weights else 0.0
            if kx[j] == 0.0:
                val = val * 0.5
                w0 = w0 * 0.5
            if mirrored:
                val = val.conjugate()
            _footprint(x0, y0, z0, fx, fy, fz, p, half, zi, yi, xi, w)
            for c in range(8):
                if xi[c] < h:
                    data_sum[zi[c], yi[c], xi[c]] += w[c] * val
                    if use_weights:
                        weight_sum[zi[c], yi[c], xi[c]] += w[c] * w0


@numba.njit(nogil=True, cache=True, fastmath=False)
def extract_slices(volume, rotations, kx, ky, pix, pad, out):
    """volume (P, P, P//2+1) complex; out (N, D·(D//2+1)) complex, written at ``pix``."""
    n = rotations.shape[0]
    m = pix.shape[0]
    p = volume.shape[0]
    h = volume.shape[2]
    half = p // 2
    zi, yi, xi = np.empty(8, np.int64), np.empty(8, np.int64), np.empty(8, np.int64)
    w = np.empty(8)
    for i in range(n):
        r = rotations[i]
        for j in range(m):
            conj, x0, y0, z0, fx, fy, fz = _corner(r, kx[j], ky[j], pad)
            _footprint(x0, y0, z0, fx, fy, fz, p, half, zi, yi, xi, w)
            acc = 0j
            for c in range(8):
                if xi[c] < h:
                    acc += w[c] * volume[zi[c], yi[c], xi[c]]
            out[i, pix[j]] = acc.conjugate() if conj else acc
