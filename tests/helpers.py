"""Shared test helpers (plain functions; fixtures live in conftest.py)."""

import numpy as np

from dask_refine.core.backprojection import FourierSums, backproject_particles
from dask_refine.core.fourier import fourier_downsample
from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH

# the S3 test server's bucket and dummy credentials (fixtures s3_endpoint, s3_env in conftest.py)
BUCKET = "particles"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def dead_pid() -> int:
    """The PID of a process that has exited (for stale-lock tests)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


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


def small_refine_dataset(root, demo_map, n_particles: int, chunk_size: int,
                         write_poses: bool = False):
    """A box-32 refinement dataset in ``root``: ``initial.mrc`` (the demo map at 4 Å/px) and
    ``p.zarr`` (SNR 1, seed 8). Returns the store."""
    from dask_refine.io.mrc import write_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store

    volume, px = demo_map
    small = downsample_to_32(volume)
    write_map(root / "initial.mrc", small, 2 * px)
    return simulate_store(small, 2 * px, root / "p.zarr",
                          SimulationConfig(n_particles=n_particles, snr=1.0,
                                           chunk_size=chunk_size, seed=8),
                          write_poses=write_poses)
