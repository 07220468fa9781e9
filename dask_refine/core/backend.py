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


def backend_module(backend: str) -> ModuleType:
    """The array module named by a job's ``backend`` setting: ``"numpy"`` or ``"cupy"``.

    Raises ``ValueError`` for another name and ``ImportError`` (with the install command) when
    CuPy is asked for but not installed."""
    if backend == "numpy":
        return np
    if backend != "cupy":
        raise ValueError(f"backend must be 'numpy' or 'cupy', not {backend!r}")
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("the GPU backend needs CuPy: pip install 'dask-refine[gpu]'") from exc
    return cupy


def kernels(xp, kernel: str = "auto"):
    """The compiled kernels for arrays of module ``xp``, or None for the array-module reference.

    ``kernel``: ``"auto"`` (NumPy: the Numba CPU kernels when installed; CuPy: the CUDA kernels
    of :mod:`._cuda_kernels` when ``numba.cuda`` is installed), ``"numba"`` (the CPU kernels,
    required), ``"cuda"`` (the CUDA kernels, required; with NumPy arrays only meaningful in
    Numba's CUDA simulator, which the tests use) or ``"numpy"`` (the reference).
    """
    if kernel == "numpy":
        return None
    if kernel == "cuda" or (kernel == "auto" and xp is not np):
        return gpu_kernels(required=kernel == "cuda")
    return cpu_kernels(kernel)


def gpu_kernels(required: bool = False):
    """The CUDA kernels module (:mod:`._cuda_kernels`), or None when ``numba.cuda`` cannot be
    imported (then CuPy arrays take the array-module reference path: gathers and
    ``cupyx.scatter_add``)."""
    try:
        from . import _cuda_kernels
    except ImportError:
        if required:
            raise
        return None
    return _cuda_kernels


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


def fft_workers(n: int | None = None):
    """A context in which this thread's NumPy-side transforms (``scipy.fft``) use ``n`` threads
    (default: every core this process may use): for the driver's large inverse transforms
    (the M-step's padded reconstructions), not for map tasks, which share the cores already.
    Thread-local: other threads, Dask's workers among them, keep one thread each."""
    import os

    import scipy.fft

    return scipy.fft.set_workers(n or max(1, len(os.sched_getaffinity(0))))


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


def segment_sums(values, starts):
    """Sums of consecutive runs of rows: ``out[i] = values[starts[i]:starts[i+1]].sum(0)``
    (the last run ends at ``len(values)``); ``starts`` a host array, increasing, from 0.
    NumPy and CuPy alike (``ufunc.reduceat`` on NumPy, cumulative sums in float64 on CuPy)."""
    xp = array_module(values)
    starts = np.asarray(starts, np.int64)
    if xp is np:
        return np.add.reduceat(values, starts, axis=0)
    wide = xp.complex128 if xp.iscomplexobj(values) else xp.float64  # pragma: no cover
    cum = xp.cumsum(values.astype(wide), axis=0)
    ends = np.append(starts[1:], values.shape[0]) - 1
    out = cum[xp.asarray(ends)]
    out[1:] -= cum[xp.asarray(ends[:-1])]
    return out.astype(values.dtype)


def free_device_bytes(xp) -> int | None:
    """Free memory of the current CUDA device in bytes (CuPy), or None on the host (NumPy).
    Counts the blocks CuPy's memory pool holds but does not use as free."""
    if xp is np:
        return None
    free, _total = xp.cuda.Device().mem_info
    pool = xp.get_default_memory_pool()
    return int(free + pool.free_bytes())


def batch_size_for_memory(bytes_per_item: int, free_bytes: int | None, default: int,
                          fraction: float = 0.25, minimum: int = 1) -> int:
    """How many items of ``bytes_per_item`` to process at once: ``default`` on the host
    (``free_bytes`` None), else as many as fit in ``fraction`` of the free device memory
    (never fewer than ``minimum``). Sizes the pose-search batches to the GPU's memory."""
    if free_bytes is None:
        return int(default)
    return max(int(minimum), int(fraction * free_bytes) // max(1, int(bytes_per_item)))
