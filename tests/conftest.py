import numpy as np
import pytest

from dask_refine.data import demo_map_path
from dask_refine.io.mrc import read_map


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_map():
    """The shipped map (PDB 1TII, box 64, 2 Å/px) as (volume float32, pixel_size_A)."""
    return read_map(demo_map_path())


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
