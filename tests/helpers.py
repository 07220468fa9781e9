"""Shared test helpers (plain functions; fixtures live in conftest.py)."""

import numpy as np

from dask_refine.core.backprojection import FourierSums, backproject_particles
from dask_refine.core.fourier import fourier_downsample
from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH


def downsample_to_32(volume) -> np.ndarray:
    """A box-64 map Fourier-cropped to box 32 (twice the pixel size)."""
    return fourier_downsample(volume, 32)


def true_pose_sums(store, pixel_size_A: float) -> FourierSums:
    """Half-set sums of a simulated store backprojected at its ground-truth poses and scales."""
    meta = store.metadata(["half_set", *CTF_COLUMNS])
    for k in ("rotation", "shift_A", "scale"):
        meta[k] = store.read_column(k, group=GROUND_TRUTH)
    return backproject_particles(FourierSums.zeros(2, store.info.box_size), store.images[:], meta,
                                 meta["half_set"], pixel_size_A)
