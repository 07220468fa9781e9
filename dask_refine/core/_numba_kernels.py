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
def _point(r, kx, ky, pad):
    px = (kx * r[0, 0] + ky * r[1, 0]) * pad
    py = (kx * r[0, 1] + ky * r[1, 1]) * pad
    pz = (kx * r[0, 2] + ky * r[1, 2]) * pad
    return px, py, pz


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
    for i in range(n):
        r = rotations[i]
        for j in range(m):
            k_x = kx[j]
            k_y = ky[j]
            px, py, pz = _point(r, k_x, k_y, pad)
            val = data[i, pix[j]]
            w0 = weights[i, pix[j]] if use_weights else 0.0
            if k_x == 0.0:
                val = val * 0.5
                w0 = w0 * 0.5
            if px < 0.0:
                px, py, pz = -px, -py, -pz
                val = val.conjugate()
            x0 = int(math.floor(px))
            y0 = int(math.floor(py))
            z0 = int(math.floor(pz))
            fx = px - x0
            fy = py - y0
            fz = pz - z0
            for dz in range(2):
                wz = fz if dz else 1.0 - fz
                zi = (z0 + dz + half) % p
                for dy in range(2):
                    wy = fy if dy else 1.0 - fy
                    yi = (y0 + dy + half) % p
                    for dx in range(2):
                        w = wz * wy * (fx if dx else 1.0 - fx)
                        xi = x0 + dx
                        if xi < h:
                            data_sum[zi, yi, xi] += w * val
                            if use_weights:
                                weight_sum[zi, yi, xi] += w * w0


@numba.njit(nogil=True, cache=True, fastmath=False)
def extract_slices(volume, rotations, kx, ky, pix, pad, out):
    """volume (P, P, P//2+1) complex; out (N, D·(D//2+1)) complex, written at ``pix``."""
    n = rotations.shape[0]
    m = pix.shape[0]
    p = volume.shape[0]
    h = volume.shape[2]
    half = p // 2
    for i in range(n):
        r = rotations[i]
        for j in range(m):
            px, py, pz = _point(r, kx[j], ky[j], pad)
            conj = px < 0.0
            if conj:
                px, py, pz = -px, -py, -pz
            x0 = int(math.floor(px))
            y0 = int(math.floor(py))
            z0 = int(math.floor(pz))
            fx = px - x0
            fy = py - y0
            fz = pz - z0
            acc = 0j
            for dz in range(2):
                wz = fz if dz else 1.0 - fz
                zi = (z0 + dz + half) % p
                for dy in range(2):
                    wy = fy if dy else 1.0 - fy
                    yi = (y0 + dy + half) % p
                    for dx in range(2):
                        xi = x0 + dx
                        if xi < h:
                            acc += wz * wy * (fx if dx else 1.0 - fx) * volume[zi, yi, xi]
            out[i, pix[j]] = acc.conjugate() if conj else acc
