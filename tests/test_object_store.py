"""Particle stores at object-store URLs, against a real S3-compatible server on loopback.

moto's server mode speaks the S3 HTTP API on 127.0.0.1; s3fs, zarr's ``FsspecStore`` and the
Dask workers (separate processes) all talk to it over HTTP, as they would to AWS or MinIO.
Endpoint and dummy credentials reach every process through the standard environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), set before the cluster
starts so that worker processes inherit them (fixtures ``s3_endpoint``/``s3_env`` in conftest.py).
Job outputs at URLs: tests/test_output_urls.py.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import starfile

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from dask_refine.io.errors import InputError  # noqa: E402
from dask_refine.io.mrc import read_map, write_map  # noqa: E402
from dask_refine.io.simulate import SimulationConfig, simulate_store  # noqa: E402
from dask_refine.io.star import export_star, import_star  # noqa: E402
from dask_refine.io.store import ParticleStore, is_url  # noqa: E402
from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct  # noqa: E402
from dask_refine.jobs.refine import RefineConfig, run_refine  # noqa: E402
from dask_refine.parallel.cluster import ClusterConfig, dask_client  # noqa: E402
from helpers import BUCKET, CREDENTIALS, downsample_to_32  # noqa: E402

@pytest.fixture(scope="module")
def small_map(demo_map):
    return downsample_to_32(demo_map[0]), 2 * demo_map[1]


SIM = SimulationConfig(n_particles=96, snr=1.0, chunk_size=24, seed=3)


def test_url_is_kept_as_given(s3_env, small_map, tmp_path):
    url = f"s3://{BUCKET}/kept.zarr"
    assert is_url(url) and not is_url(str(tmp_path)) and not is_url(tmp_path)
    store = simulate_store(*small_map, url, SimulationConfig(n_particles=8, chunk_size=4))
    assert store.path == url
    import s3fs

    keys = s3fs.S3FileSystem().find(f"{BUCKET}/kept.zarr")
    assert f"{BUCKET}/kept.zarr/zarr.json" in keys
    assert f"{BUCKET}/kept.zarr/images/c/1/0/0" in keys  # chunks live in the bucket
    again = ParticleStore.open(url)
    assert again.path == url and again.info.n_particles == 8
    np.testing.assert_array_equal(again.images[:], store.images[:])
    with pytest.raises(InputError, match="already exists"):
        ParticleStore.create(url, 8, 32, 1.0)
    with pytest.raises(InputError, match="no such particle store"):
        ParticleStore.open(f"s3://{BUCKET}/missing.zarr")
    with pytest.raises(ValueError, match="read-only"):  # jobs open stores read-only
        again.write_column("scale", np.ones(8))


def test_import_star_to_a_url(s3_env, small_map, tmp_path):
    local = simulate_store(*small_map, tmp_path / "sim.zarr",
                           SimulationConfig(n_particles=8, chunk_size=4), write_poses=True)
    star = export_star(local, tmp_path / "out" / "sim.star")  # with sim.mrcs beside it
    url = f"s3://{BUCKET}/imported.zarr"
    imported = import_star(star, url, chunk_size=4)
    assert imported.path == url
    again = ParticleStore.open(url)
    np.testing.assert_array_equal(again.images[:], local.images[:])
    np.testing.assert_allclose(again.read_column("rotation"), local.read_column("rotation"),
                               atol=1e-6)
    # a failed import removes its half-made store from the bucket, as it does from a disk
    import s3fs

    table = starfile.read(star)
    table["particles"].loc[3, "rlnImageName"] = "000099@sim.mrcs"
    starfile.write(table, tmp_path / "out" / "bad.star")
    with pytest.raises(InputError):
        import_star(tmp_path / "out" / "bad.star", f"s3://{BUCKET}/bad.zarr", chunk_size=4)
    assert not s3fs.S3FileSystem().exists(f"{BUCKET}/bad.zarr")


def test_explicit_storage_options(s3_endpoint, small_map, monkeypatch):
    """Endpoint and credentials as a ``storage_options`` dict, with none in the environment."""
    for name in (*CREDENTIALS, "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
    url = f"s3://{BUCKET}/explicit.zarr"
    simulate_store(*small_map, url, SimulationConfig(n_particles=8, chunk_size=4),
                   storage_options=options)
    store = ParticleStore.open(url, storage_options=options)
    assert store.info.n_particles == 8 and store.storage_options == options
    # a task's pickled array carries the options: a process with no AWS_* variables (a worker)
    # re-creates the filesystem from them and reads the chunks
    import s3fs

    images = store.images_dask()
    s3fs.S3FileSystem.clear_instance_cache()
    blob = pickle.dumps(images.to_delayed().ravel().tolist())
    s3fs.S3FileSystem.clear_instance_cache()
    chunks = [block.compute(scheduler="sync") for block in pickle.loads(blob)]
    np.testing.assert_array_equal(np.concatenate(chunks), store.images[:])


def _assert_same_maps(folder, reference):
    for name in ("half_A.mrc", "half_B.mrc", "map.mrc"):
        a, b = read_map(folder / name)[0], read_map(reference / name)[0]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_reconstruct_reads_a_url_as_a_local_store(s3_env, small_map, tmp_path):
    """Reconstruct on an embedded cluster of two worker processes: each worker reads its chunks
    from the object store itself (its environment holds the endpoint), and the maps equal those
    of the same job on an identical local store. Then the same through the CLI."""
    url = f"s3://{BUCKET}/p.zarr"
    simulate_store(*small_map, url, SIM, write_poses=True)
    simulate_store(*small_map, tmp_path / "p.zarr", SIM, write_poses=True)
    with dask_client(ClusterConfig(n_workers=2, dashboard_address=None)) as client:
        for name, store in (("remote", url), ("local", str(tmp_path / "p.zarr"))):
            run_reconstruct(ReconstructConfig(store=store, out_dir=str(tmp_path / name)),
                            client=client, log=lambda m: None)
    _assert_same_maps(tmp_path / "remote", tmp_path / "local")
    config = json.loads((tmp_path / "remote" / "config.json").read_text())
    assert config["store"] == url  # recorded as given, not collapsed to "s3:/…"

    # the CLI takes the URL as it is; its process and its workers get the endpoint from the
    # environment they inherit
    r = subprocess.run([sys.executable, "-m", "dask_refine.ui.cli", "reconstruct", url,
                        "--out", str(tmp_path / "cli"), "--n-workers", "1"],
                       capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    _assert_same_maps(tmp_path / "cli", tmp_path / "local")


@pytest.mark.slow
def test_refine_reads_a_url_as_a_local_store(s3_env, small_map, tmp_path):
    url = f"s3://{BUCKET}/refine.zarr"
    simulate_store(*small_map, url, SIM)
    simulate_store(*small_map, tmp_path / "p.zarr", SIM)
    write_map(tmp_path / "initial.mrc", *small_map)
    with dask_client(ClusterConfig(n_workers=2, dashboard_address=None)) as client:
        for name, store in (("remote", url), ("local", str(tmp_path / "p.zarr"))):
            run_refine(RefineConfig(store=store, initial_map=str(tmp_path / "initial.mrc"),
                                    out_dir=str(tmp_path / name), max_iterations=2),
                       client=client, log=lambda m: None)
    _assert_same_maps(tmp_path / "remote", tmp_path / "local")
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["store"] == url


def test_unreachable_or_missing_backend_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(InputError, match="cannot reach the object store"):
        ParticleStore.open(f"s3://{BUCKET}/p.zarr", storage_options={"connect_timeout": 2,
                                                                     "retries": 0})
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(InputError, match="not a usable store URL"):
        ParticleStore.open("nosuchprotocol://b/p.zarr")
    with pytest.raises(InputError, match="only used with an object-store URL"):
        ParticleStore.create(tmp_path / "x.zarr", 4, 32, 1.0, storage_options={"anon": True})
