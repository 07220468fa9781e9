"""Numba CPU kernels for trilinear slice insertion and extraction (the CPU hot loops).

Same arithmetic as the NumPy reference in :mod:`.projection` (see its docstring for the
conventions); tests check that both agree. Loaded lazily by :mod:`.backend` when Numba is
installed; ``nogil`` so threaded Dask workers run them in parallel.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, fastmath=False, inline="always")
def _point(r, pad, kx, ky):
    """Point pad·Aᵀ(kx, ky, 0) mirrored to x ≥ 0 and its trilinear cell: (mirrored, x0, the two
    z and y indices wrapped into the padded box, fx, fy, fz)."""
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


@numba.njit(nogil=True, cache=True, fastmath=False, inline="always")
def _wrap(i, p):
    """``i % p`` (Python's, non-negative) without the integer division where ``i`` lies in
    [−p, 2p), as every index of a slice within the padded box's radius does: the division
    cost more than the rest of a trilinear read."""
    if i >= p:
        return i - p if i < 2 * p else i % p
    if i < 0:
        return i + p if i >= -p else i % p
    return i


@numba.njit(nogil=True, cache=True, fastmath=False)
def insert_slices(data, weights, rotations, kx, ky, pix, pad, data_sum, weight_sum,
                  use_weights):
    """data (N, D·(D//2+1)) complex; weights same shape real; rotations (N, 3, 3) float64;
    kx, ky (M,) frequencies of the used pixels and ``pix`` (M,) their flat indices;
    data_sum / weight_sum (P, P, P//2+1) accumulated in place. The 8 corners are unrolled
    (corner x0 + 1 is skipped where it lies beyond the half-space's last column)."""
    n = data.shape[0]
    m = pix.shape[0]
    p = data_sum.shape[0]
    h = data_sum.shape[2]
    half = p // 2
    for i in range(n):
        r = rotations[i]
        for j in range(m):
            mirrored, x0, y0, z0, fx, fy, fz = _point(r, pad, kx[j], ky[j])
            val = data[i, pix[j]]
            w0 = weights[i, pix[j]] if use_weights else 0.0
            if kx[j] == 0.0:
                val = val * 0.5
                w0 = w0 * 0.5
            if mirrored:
                val = val.conjugate()
            za, zb = _wrap(z0 + half, p), _wrap(z0 + 1 + half, p)
            ya, yb = _wrap(y0 + half, p), _wrap(y0 + 1 + half, p)
            gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
            x1 = x0 + 1
            inside = x1 < h
            for z, wz in ((za, gz), (zb, fz)):
                for y, wy in ((ya, gy), (yb, fy)):
                    w = wz * wy * gx
                    data_sum[z, y, x0] += w * val
                    if use_weights:
                        weight_sum[z, y, x0] += w * w0
                    if inside:
                        w = wz * wy * fx
                        data_sum[z, y, x1] += w * val
                        if use_weights:
                            weight_sum[z, y, x1] += w * w0


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
            conj, x0, y0, z0, fx, fy, fz = _point(r, pad, kx[j], ky[j])
            za, zb = _wrap(z0 + half, p), _wrap(z0 + 1 + half, p)
            ya, yb = _wrap(y0 + half, p), _wrap(y0 + 1 + half, p)
            gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
            inside = x0 + 1 < h
            acc = (gz * gy * gx) * volume[za, ya, x0]
            if inside:
                acc += (gz * gy * fx) * volume[za, ya, x0 + 1]
            acc += (gz * fy * gx) * volume[za, yb, x0]
            if inside:
                acc += (gz * fy * fx) * volume[za, yb, x0 + 1]
            acc += (fz * gy * gx) * volume[zb, ya, x0]
            if inside:
                acc += (fz * gy * fx) * volume[zb, ya, x0 + 1]
            acc += (fz * fy * gx) * volume[zb, yb, x0]
            if inside:
                acc += (fz * fy * fx) * volume[zb, yb, x0 + 1]
            out[i, pix[j]] = acc.conjugate() if conj else acc
