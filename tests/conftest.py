import logging

import numpy as np
import pytest

from dask_refine.data import demo_map_path
from dask_refine.io.mrc import read_map
from helpers import BUCKET, CREDENTIALS


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server (a real S3 HTTP API) on a free loopback port, with one empty bucket;
    one per session (moto's backend state is per process, shared by every server in it)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing",
                      client_kwargs={"endpoint_url": endpoint}).mkdir(BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """The endpoint and dummy credentials in this process's environment (and so in every process
    it starts), as a user's shell or a cluster's worker environment would hold them."""
    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances made under another environment
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()
