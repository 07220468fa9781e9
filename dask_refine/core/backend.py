"""The few array-backend-specific operations (NumPy on CPU, CuPy on GPU) in one place.

Kernels call :func:`array_module` on their inputs and use the returned module for everything
else, so the same code runs on both backends. CuPy is never imported at module level.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def array_module(*arrays) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    return np


def cpu_kernels(kernel: str = "auto"):
    """The Numba CPU kernels module (:mod:`._numba_kernels`), or None for the NumPy reference.

    ``kernel``: ``"auto"`` (Numba when installed), ``"numba"`` (required) or ``"numpy"``.
    """
    if kernel == "numpy":
        return None
    try:
        from . import _numba_kernels
    except ImportError:
        if kernel == "numba":
            raise
        return None
    return _numba_kernels


def fft_module(xp):
    """FFT functions for an array module: ``scipy.fft`` for NumPy (faster than ``numpy.fft``),
    ``cupy.fft`` for CuPy."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    return xp.fft


def to_numpy(a) -> np.ndarray:
    """Copy a NumPy or CuPy array to host memory as a NumPy array."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)


def scatter_add(target_flat, indices, values) -> None:
    """``target_flat[indices] += values`` with repeated indices accumulated (unbuffered).

    ``target_flat`` is a 1-D real array; ``indices`` integer, ``values`` real, same shape.
    NumPy: ``bincount`` (much faster than ``np.add.at``); CuPy: ``cupyx.scatter_add``.
    """
    xp = array_module(target_flat)
    if xp is np:
        target_flat += np.bincount(
            indices.ravel(), weights=values.ravel(), minlength=target_flat.size
        ).astype(target_flat.dtype, copy=False)
    else:  # pragma: no cover - exercised only on GPU machines
        import cupyx

        cupyx.scatter_add(target_flat, indices.ravel(), values.ravel().astype(target_flat.dtype))
