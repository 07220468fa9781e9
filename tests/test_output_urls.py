"""Job outputs at an object-store URL (``--out s3://…``), against a real S3 server on loopback.

The jobs stage their outputs on the driver's disk and publish them as they go: each iteration
with its ``state.json`` (the completeness marker) uploaded last, the final outputs with
``summary.json`` last. These tests check what lands in the bucket against the same job written
to a local folder, the upload order, that a half-uploaded iteration is never resumed, the lock
(a conditional put), a refinement killed mid-run and resumed from the URL, and the report.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from dask_refine.io.errors import InputError  # noqa: E402
from dask_refine.io.mrc import read_map  # noqa: E402
from dask_refine.io.output_folder import OutputFolder  # noqa: E402
from dask_refine.jobs.checkpoint import (RunLock, check_resumable, completed_iterations,  # noqa: E402
                                         fetch_checkpoint, publish_iteration)
from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct  # noqa: E402
from dask_refine.jobs.refine import RefineConfig, run_refine  # noqa: E402
from dask_refine.parallel.cluster import ClusterConfig, dask_client  # noqa: E402
from dask_refine.ui.cli import main  # noqa: E402
from helpers import BUCKET, dead_pid, small_refine_dataset  # noqa: E402


def _s3():
    """A client that sees the bucket as it is now (no cached listings)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _published(url: str) -> set[str]:
    root = url.removeprefix("s3://")
    return {p[len(root) + 1:] for p in _s3().find(root)}


def _local_files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def _download_map(url: str, tmp_path, name: str) -> np.ndarray:
    target = tmp_path / "downloaded" / name.replace("/", "_")
    target.parent.mkdir(exist_ok=True)
    _s3().get(url.removeprefix("s3://") + "/" + name, str(target))
    return read_map(target)[0]


@pytest.fixture
def staging_root(tmp_path, monkeypatch):
    """Staging folders go under this folder, so a test can see that they are removed."""
    root = tmp_path / "staging"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, demo_map):
    root = tmp_path_factory.mktemp("urls")
    return root, small_refine_dataset(root, demo_map, n_particles=40, chunk_size=10,
                                      write_poses=True)


def test_reconstruct_to_a_url_publishes_what_a_local_run_writes(s3_env, dataset, tmp_path,
                                                                staging_root, capsys):
    root, store = dataset
    url = f"s3://{BUCKET}/jobs/reconstruct"
    with dask_client(ClusterConfig(n_workers=1, dashboard_address=None)) as client:
        for out in (url, str(tmp_path / "local")):
            run_reconstruct(ReconstructConfig(store=str(store.path), out_dir=out), client=client,
                            log=lambda m: None)
    local = tmp_path / "local"
    assert _published(url) == _local_files(local)  # every output, nothing else (no .lock, tmp)
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        np.testing.assert_array_equal(_download_map(url, tmp_path, name),
                                      read_map(local / name)[0])
    summary = json.loads(_s3().cat_file(url.removeprefix("s3://") + "/summary.json"))
    assert summary["outputs"]["map"] == f"{url}/map.mrc"  # named where they are, not staged
    assert summary["outputs_particles"] == f"{url}/particles.star"
    assert all(str(v).startswith(url + "/") for v in summary["outputs"].values())
    assert list(staging_root.glob("dask-refine-out-*")) == []  # the staging folder is gone

    # the report of a URL folder reads it there and is uploaded beside it
    assert main(["report", url]) == 0
    assert capsys.readouterr().out.strip() == f"{url}/report.html"
    page = _s3().cat_file(url.removeprefix("s3://") + "/report.html").decode()
    assert url in page and 'href="map.mrc"' in page and "data:image/png;base64," in page
    assert list(staging_root.glob("dask-refine-out-*")) == []


def test_publish_uploads_the_marker_last_and_frees_the_previous_iteration(s3_env, tmp_path,
                                                                          monkeypatch):
    url = f"s3://{BUCKET}/jobs/order"
    with OutputFolder(url) as out:
        calls = []
        put = out.fs.put
        monkeypatch.setattr(out.fs, "put", lambda lpaths, rpaths, **kw: (
            calls.append([r.rsplit("/", 1)[-1] for r in rpaths]), put(lpaths, rpaths, **kw)))
        for it in (1, 2):
            folder = out.local / "iterations" / f"iter_{it:03d}"
            (folder / "class_001").mkdir(parents=True)
            for name in ("state.json", "poses.npz", "half_A.mrc", "class_001/map.mrc"):
                (folder / name).write_text(name)
            (folder / ".tmp").write_text("hidden")
            publish_iteration(out, it)
        assert calls[0] and "state.json" not in calls[0] and calls[1] == ["state.json"]
        assert calls[2:] == calls[:2]
        # the staging copy keeps only the last iteration whole
        assert _local_files(out.local / "iterations") == {
            "iter_001/state.json", "iter_002/state.json", "iter_002/poses.npz",
            "iter_002/half_A.mrc", "iter_002/class_001/map.mrc"}
        assert not any(".tmp" in p for p in _published(url))
        assert out.name(out.local / "iterations") == f"{url}/iterations"


def test_a_half_uploaded_iteration_is_never_resumed(s3_env, tmp_path):
    url = f"s3://{BUCKET}/jobs/partial"
    fs, root = _s3(), url.removeprefix("s3://")
    fs.pipe({f"{root}/config.json": b'{"pad": 2}',
             f"{root}/iterations/iter_001/state.json": b'{"iteration": 1}',
             f"{root}/iterations/iter_001/poses.npz": b"poses",
             f"{root}/iterations/iter_001/class_002/reference_A.mrc": b"map",
             f"{root}/iterations/iter_002/poses.npz": b"cut off before its state.json"})
    with OutputFolder(url) as out:
        fetch_checkpoint(out, resume=True)
        assert completed_iterations(out.local) == [1]
        assert (out.local / "iterations/iter_001/class_002/reference_A.mrc").read_bytes() == b"map"
        assert not (out.local / "iterations/iter_002").exists()
        assert check_resumable(out, {"pad": 2}, True, ["pad"]) == [1]
        with pytest.raises(InputError, match=f"{url}/config.json: .*different pad"):
            check_resumable(out, {"pad": 3}, True, ["pad"])
    with OutputFolder(url) as out:  # without --resume: only the small files, then a refusal
        fetch_checkpoint(out, resume=False)
        assert not (out.local / "iterations/iter_001/poses.npz").exists()
        with pytest.raises(InputError, match=f"^{url}: already holds a run; pass --resume"):
            check_resumable(out, {"pad": 2}, False, ["pad"])


def test_the_lock_at_a_url_is_a_conditional_put(s3_env):
    url = f"s3://{BUCKET}/jobs/locked"
    lock = url.removeprefix("s3://") + "/.lock"
    with OutputFolder(url) as out, RunLock(out):
        assert _s3().cat_file(lock).decode() == f"{socket.gethostname()} {os.getpid()}"
        with OutputFolder(url) as other, pytest.raises(InputError, match="another run"):
            RunLock(other).__enter__()
    assert not _s3().exists(lock)
    _s3().pipe(lock, f"{socket.gethostname()} {dead_pid()}".encode())  # a killed run's lock
    with OutputFolder(url) as out, RunLock(out):
        assert _s3().cat_file(lock).decode().endswith(str(os.getpid()))
    _s3().pipe(lock, b"refine-pod-7f9c 1")
    with OutputFolder(url) as out, pytest.raises(InputError, match=f"refine-pod-7f9c.*delete "
                                                 f"{url}/.lock"):
        with RunLock(out):
            pass
    assert _s3().cat_file(lock) == b"refine-pod-7f9c 1"  # left for the user


def test_an_unreachable_output_url_is_one_clear_error(tmp_path, monkeypatch, staging_root):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.chdir(tmp_path)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(InputError, match="s3://b/out: cannot reach the object store"):
        with OutputFolder("s3://b/out", storage_options={"connect_timeout": 2, "retries": 0}):
            pass
    s3fs.S3FileSystem.clear_instance_cache()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staging"]  # no local "s3:/b/out"
    assert list(staging_root.glob("dask-refine-out-*")) == []  # nor a staging folder left


def test_a_filesystem_without_exclusive_create_is_refused(staging_root):
    """fsspec's HTTP filesystem is read-only: no conditional put, so no lock and no run."""
    with pytest.raises(InputError, match="http://127.0.0.1:9/out: this filesystem cannot create "
                                         "a file exclusively"):
        with OutputFolder("http://127.0.0.1:9/out") as out, RunLock(out):
            pass
    assert list(staging_root.glob("dask-refine-out-*")) == []


def _refine_cmd(root, out, *extra):
    return [sys.executable, "-m", "dask_refine.ui.cli", "refine", str(root / "p.zarr"),
            "--initial", str(root / "initial.mrc"), "--out", str(out), "--max-iterations", "3",
            "--n-workers", "1", *extra]


def _same_results(url: str, local, tmp_path, last_iteration: int) -> None:
    """The maps and last poses at ``url`` equal those in the local folder ``local``."""
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        a = read_map(local / name)[0]
        np.testing.assert_allclose(_download_map(url, tmp_path, name), a, rtol=0,
                                   atol=1e-5 * np.abs(a).max(), err_msg=name)
    poses = tmp_path / "poses.npz"
    it = f"iterations/iter_{last_iteration:03d}/poses.npz"
    _s3().get(url.removeprefix("s3://") + "/" + it, str(poses))
    expected = np.load(local / it)
    for key in ("rotation", "origin_px", "scale"):
        np.testing.assert_allclose(np.load(poses)[key], expected[key], atol=1e-9, err_msg=key)
    published = _published(url)
    assert {p for p in _local_files(local) if not p.startswith("iterations/")} <= published
    assert ".lock" not in published
    summary = json.loads(_s3().cat_file(url.removeprefix("s3://") + "/summary.json"))
    assert summary["outputs"]["map"] == f"{url}/map.mrc"
    assert summary["iterations"] == last_iteration


def test_refine_to_a_url_resumes_from_it(s3_env, dataset, tmp_path, staging_root):
    """A refinement into the bucket stopped after one iteration and resumed from the URL (a
    fresh staging folder: only what the bucket holds) ends as the same run made locally."""
    root, _ = dataset

    def config(out, **kw):  # a coarse search: the test is about the outputs, not the poses
        return RefineConfig(store=str(root / "p.zarr"), initial_map=str(root / "initial.mrc"),
                            out_dir=out, **{"max_iterations": 2, "max_level": 4,
                                               "min_global_iterations": 1,
                                               "first_level_candidates": 256, **kw})

    url = f"s3://{BUCKET}/jobs/refine-resume"
    logs = []
    with dask_client(ClusterConfig(n_workers=1, dashboard_address=None)) as client:
        run_refine(config(str(tmp_path / "local")), client=client, log=lambda m: None)
        run_refine(config(url, max_iterations=1), client=client, log=lambda m: None)
        assert not _s3().exists(url.removeprefix("s3://") + "/iterations/iter_002")
        run_refine(config(url, resume=True), client=client, log=logs.append)
    assert any("resuming after iteration 1" in m for m in logs)
    _same_results(url, tmp_path / "local", tmp_path, 2)
    assert list(staging_root.glob("dask-refine-out-*")) == []


@pytest.mark.slow
def test_refine_to_a_url_killed_and_resumed_equals_the_local_run(s3_env, dataset, tmp_path):
    """The CLI refines into the bucket and is killed (whole process group, SIGKILL) once
    iteration 1 is published; without --resume the folder is refused, with it the run continues
    from the URL (the dead run's lock taken over) and ends with the local run's maps and poses."""
    root, _ = dataset
    url = f"s3://{BUCKET}/jobs/refine"
    local = subprocess.run(_refine_cmd(root, tmp_path / "local"), capture_output=True,
                           text=True, timeout=600)
    assert local.returncode == 0, local.stderr
    proc = subprocess.Popen(_refine_cmd(root, url), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = url.removeprefix("s3://") + "/iterations/iter_001/state.json"
    deadline = time.time() + 300
    while not _s3().exists(marker):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "summary.json" not in _published(url)
    again = subprocess.run(_refine_cmd(root, url), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and f"{url}: already holds a run" in again.stderr
    resumed = subprocess.run(_refine_cmd(root, url, "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after iteration" in resumed.stdout + resumed.stderr
    _same_results(url, tmp_path / "local", tmp_path, 3)
