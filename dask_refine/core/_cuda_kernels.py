"""CUDA kernels for trilinear slice insertion (scatter-add) and extraction (the GPU hot loops).

Same arithmetic as the Numba CPU kernels in :mod:`._numba_kernels` and the array-module
reference in :mod:`.projection` (conventions in its docstring): one thread per (image, used
pixel); coordinates in float64 as on the CPU; insertion adds with atomics into the padded
half-space sums. Written with ``numba.cuda`` (the ``numba-cuda`` package in the ``[gpu]``
extra), which launches on any array exposing ``__cuda_array_interface__`` (CuPy arrays, without
copies) and which has a CPU simulator (``NUMBA_ENABLE_CUDASIM=1``): the tests run these kernels
in the simulator on machines without a GPU and compare them with the CPU kernels, and on the
device (``gpu`` tests) against NumPy.

Loaded lazily by :func:`.backend.gpu_kernels`; nothing here runs at import time.
"""

from __future__ import annotations

import math

from numba import cuda

#: Threads per block of both kernels.
THREADS_PER_BLOCK = 256


@cuda.jit
def _insert_kernel(data_re_im, weights, rotations, kx, ky, pix, pad, sum_re_im, weight_sum,
                   use_weights):
    """data_re_im (N, 2·D·H) float32 interleaved (re, im); weights (N, D·H) float32;
    sum_re_im (P, P, 2·(P//2+1)) float32 interleaved view of the complex sum;
    weight_sum (P, P, P//2+1) float32."""
    t = cuda.grid(1)
    m = pix.shape[0]
    if t >= rotations.shape[0] * m:
        return
    i = t // m
    j = t - i * m
    p = sum_re_im.shape[0]
    h = sum_re_im.shape[2] // 2
    half = p // 2
    # the point pad·Aᵀ(kx, ky, 0) (written out: a device function would need a GPU to compile)
    px = (kx[j] * rotations[i, 0, 0] + ky[j] * rotations[i, 1, 0]) * pad
    py = (kx[j] * rotations[i, 0, 1] + ky[j] * rotations[i, 1, 1]) * pad
    pz = (kx[j] * rotations[i, 0, 2] + ky[j] * rotations[i, 1, 2]) * pad
    k = pix[j]
    re = float(data_re_im[i, 2 * k])
    im = float(data_re_im[i, 2 * k + 1])
    w0 = float(weights[i, k]) if use_weights else 0.0
    if kx[j] == 0.0:
        re *= 0.5
        im *= 0.5
        w0 *= 0.5
    if px < 0.0:  # mirrored to -p: the conjugate value
        px, py, pz = -px, -py, -pz
        im = -im
    x0 = int(math.floor(px))
    y0 = int(math.floor(py))
    z0 = int(math.floor(pz))
    fx, fy, fz = px - x0, py - y0, pz - z0
    for dz in range(2):
        wz = fz if dz else 1.0 - fz
        zi = (z0 + dz + half) % p
        for dy in range(2):
            wy = fy if dy else 1.0 - fy
            yi = (y0 + dy + half) % p
            for dx in range(2):
                xi = x0 + dx
                if xi < h:
                    w = wz * wy * (fx if dx else 1.0 - fx)
                    cuda.atomic.add(sum_re_im, (zi, yi, 2 * xi), w * re)
                    cuda.atomic.add(sum_re_im, (zi, yi, 2 * xi + 1), w * im)
                    if use_weights:
                        cuda.atomic.add(weight_sum, (zi, yi, xi), w * w0)


@cuda.jit
def _extract_kernel(volume, rotations, kx, ky, pix, pad, out):
    """volume (P, P, P//2+1) complex; out (N, D·H) complex, written at ``pix``."""
    t = cuda.grid(1)
    m = pix.shape[0]
    if t >= rotations.shape[0] * m:
        return
    i = t // m
    j = t - i * m
    p = volume.shape[0]
    h = volume.shape[2]
    half = p // 2
    # the point pad·Aᵀ(kx, ky, 0) (written out: a device function would need a GPU to compile)
    px = (kx[j] * rotations[i, 0, 0] + ky[j] * rotations[i, 1, 0]) * pad
    py = (kx[j] * rotations[i, 0, 1] + ky[j] * rotations[i, 1, 1]) * pad
    pz = (kx[j] * rotations[i, 0, 2] + ky[j] * rotations[i, 1, 2]) * pad
    conj = px < 0.0
    if conj:
        px, py, pz = -px, -py, -pz
    x0 = int(math.floor(px))
    y0 = int(math.floor(py))
    z0 = int(math.floor(pz))
    fx, fy, fz = px - x0, py - y0, pz - z0
    acc_re = 0.0
    acc_im = 0.0
    for dz in range(2):
        wz = fz if dz else 1.0 - fz
        zi = (z0 + dz + half) % p
        for dy in range(2):
            wy = fy if dy else 1.0 - fy
            yi = (y0 + dy + half) % p
            for dx in range(2):
                xi = x0 + dx
                if xi < h:
                    w = wz * wy * (fx if dx else 1.0 - fx)
                    v = volume[zi, yi, xi]
                    acc_re += w * v.real
                    acc_im += w * v.imag
    out[i, pix[j]] = complex(acc_re, -acc_im if conj else acc_im)


def _blocks(n_threads: int) -> int:
    return max(1, (n_threads + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK)


def insert_slices(data, weights, rotations, kx, ky, pix, pad, data_sum, weight_sum,
                  use_weights):
    """Same signature and result as :func:`._numba_kernels.insert_slices`, on device arrays:
    data (N, D·H) complex64, weights (N, D·H) float32, rotations (N, 3, 3) float64, kx/ky (M,)
    float64, pix (M,) int64, data_sum (P, P, P//2+1) complex64 (C-contiguous),
    weight_sum (P, P, P//2+1) float32."""
    n, m = rotations.shape[0], pix.shape[0]
    if n * m == 0:
        return
    p, h = data_sum.shape[0], data_sum.shape[2]
    data_re_im = data.view(data.real.dtype).reshape(n, -1)
    sum_re_im = data_sum.view(data_sum.real.dtype).reshape(p, p, 2 * h)
    _insert_kernel[_blocks(n * m), THREADS_PER_BLOCK](
        data_re_im, weights, rotations, kx, ky, pix, float(pad), sum_re_im, weight_sum,
        bool(use_weights))


def extract_slices(volume, rotations, kx, ky, pix, pad, out):
    """Same signature and result as :func:`._numba_kernels.extract_slices`, on device arrays."""
    n, m = rotations.shape[0], pix.shape[0]
    if n * m == 0:
        return
    _extract_kernel[_blocks(n * m), THREADS_PER_BLOCK](volume, rotations, kx, ky, pix,
                                                       float(pad), out)
