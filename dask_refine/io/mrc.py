"""MRC maps and particle stacks through ``mrcfile``, with clear errors and atomic writes.

Arrays are ``[z, y, x]`` (maps) and ``[n, y, x]`` (stacks) as mrcfile returns them; voxel size in Å.
Writes go to a temporary name in the same folder and are renamed into place, so a crash never
leaves a half-written file behind.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from .errors import InputError


def _open(path, mmap: bool):
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file (expected an MRC map or stack)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opener = mrcfile.mmap if mmap else mrcfile.open
            return opener(path, mode="r", permissive=False)
    except (ValueError, OSError, EOFError, OverflowError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None


def _voxel_size_A(mrc, path) -> float:
    size = float(mrc.voxel_size.x)
    if not np.isfinite(size) or size <= 0:
        raise InputError(path, f"voxel size in the MRC header is {size}; expected > 0 Å")
    return size


def read_map(path) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map: ``(volume [z, y, x] float32, voxel_size_A)``.

    Raises :class:`InputError` for a missing or unreadable file, a non-3D or non-cubic map, an
    odd box, a missing voxel size, or non-finite values.
    """
    with _open(path, mmap=False) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        voxel = _voxel_size_A(mrc, path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(path, f"map shape is {data.shape}; expected a cubic 3D map (D, D, D)")
    if data.shape[0] % 2:
        raise InputError(path, f"box size {data.shape[0]} is odd; expected an even box")
    if not np.isfinite(data).all():
        raise InputError(path, "map contains NaN or Inf values")
    return data.copy(), voxel


class StackReader:
    """Memory-mapped read access to one MRC particle stack (``[n, y, x]``)."""

    def __init__(self, path):
        self.path = Path(path)
        self._mrc = _open(self.path, mmap=True)
        data = self._mrc.data
        if data.ndim == 2:  # a single image
            data = data[None]
        if data.ndim != 3 or data.shape[1] != data.shape[2]:
            self.close()
            raise InputError(self.path, f"stack shape is {data.shape}; expected (n, D, D) images")
        self.data = data
        self.voxel_size_A = float(self._mrc.voxel_size.x)

    @property
    def n_images(self) -> int:
        return self.data.shape[0]

    @property
    def box_size(self) -> int:
        return self.data.shape[1]

    def read(self, indices) -> np.ndarray:
        """Images at 0-based ``indices`` as float32 ``(len(indices), D, D)``."""
        indices = np.asarray(indices)
        bad = indices[(indices < 0) | (indices >= self.n_images)]
        if bad.size:
            raise InputError(self.path, f"image number {int(bad[0]) + 1} requested; the stack "
                             f"has {self.n_images} images")
        return np.asarray(self.data[indices], dtype=np.float32)

    def close(self) -> None:
        self._mrc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _atomic_new_mrc(path, data: np.ndarray, voxel_size_A: float, stack: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size_A
        mrc.header.origin = (0.0, 0.0, 0.0)
        mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
        if stack:
            mrc.set_image_stack()
    os.replace(tmp, path)


def write_map(path, volume, voxel_size_A: float) -> None:
    """Write a 3D map ``[z, y, x]`` as float32 MRC (mode 2) with its voxel size, atomically."""
    data = np.ascontiguousarray(np.asarray(volume, dtype=np.float32))
    if data.ndim != 3:
        raise ValueError(f"write_map expects a 3D volume, got shape {data.shape}")
    _atomic_new_mrc(path, data, voxel_size_A)


def write_stack(path, images, voxel_size_A: float, rows_per_block: int | None = None) -> None:
    """Write images ``(n, D, D)`` as a float32 MRC stack (``.mrcs``, ispg 0), atomically.

    ``images``: an array, or anything that slices like one (a zarr array): it is copied
    ``rows_per_block`` rows at a time (default: its chunks, else 1024) into a memory-mapped file,
    so a stack larger than memory is never loaded whole. Header statistics (dmin, dmax, dmean,
    rms) are accumulated block by block, as mrcfile's ``update_header_stats`` computes them."""
    shape = tuple(int(s) for s in images.shape)
    if len(shape) != 3:
        raise ValueError(f"write_stack expects (n, D, D) images, got shape {shape}")
    chunks = getattr(images, "chunks", None)
    block = int(rows_per_block or (chunks[0] if chunks and isinstance(chunks[0], int) else 1024))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    lo, hi, total, squares, count = np.inf, -np.inf, 0.0, 0.0, 0
    with mrcfile.new_mmap(tmp, shape=shape, mrc_mode=2, overwrite=True) as mrc:
        for start in range(0, shape[0], max(1, block)):
            rows = np.asarray(images[start:start + block], dtype=np.float32)
            mrc.data[start:start + rows.shape[0]] = rows
            if rows.size:
                lo, hi = min(lo, float(rows.min())), max(hi, float(rows.max()))
                total += float(rows.sum(dtype=np.float64))
                squares += float(np.square(rows, dtype=np.float64).sum())
                count += rows.size
        mrc.voxel_size = voxel_size_A
        mrc.header.origin = (0.0, 0.0, 0.0)
        mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
        mrc.set_image_stack()
        if count:
            mean = total / count
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = np.sqrt(max(0.0, squares / count - mean * mean))
    os.replace(tmp, path)
