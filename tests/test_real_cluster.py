"""Jobs on a real multi-process cluster: ``dask scheduler`` and ``dask worker`` processes on
loopback, reached with ``--scheduler ADDRESS``, give the embedded cluster's result; workers that
join and leave between iterations (adaptive scaling) do not change it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dask_refine.io.mrc import read_map
from dask_refine.jobs.refine import RefineConfig, run_refine
from dask_refine.parallel.cluster import ClusterConfig
from helpers import small_refine_dataset

DASK = str(Path(sys.executable).parent / "dask")


class RealCluster:
    """``dask scheduler`` + ``dask worker`` processes on 127.0.0.1."""

    def __init__(self, folder: Path, n_workers: int):
        self.folder = folder
        sched_file = folder / "scheduler.json"
        self.scheduler = subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
             "127.0.0.1:0", "--scheduler-file", str(sched_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.address = json.loads(sched_file.read_text())["address"]
        self.workers = [self.add_worker(f"w{i}") for i in range(n_workers)]

    def add_worker(self, name: str) -> subprocess.Popen:
        return subprocess.Popen([DASK, "worker", self.address, "--nthreads", "1", "--host",
                                 "127.0.0.1", "--name", name, "--memory-limit", "2GiB"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self):
        for p in self.workers[::-1] + [self.scheduler]:
            p.terminate()
        for p in self.workers + [self.scheduler]:
            try:  # a graceful close is not what these tests are about: 3 s, then kill
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(tmp_path):
    c = RealCluster(tmp_path, n_workers=2)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, demo_map):
    root = tmp_path_factory.mktemp("real_cluster")
    return root, small_refine_dataset(root, demo_map, n_particles=160, chunk_size=40,
                                      write_poses=True)


def _cli(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dask_refine.ui.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def _maps(folder: Path):
    return [read_map(folder / f"{name}.mrc")[0] for name in ("half_A", "half_B", "map")]


def test_reconstruct_through_a_scheduler_address_equals_the_embedded_cluster(cluster, dataset,
                                                                            tmp_path):
    root, _ = dataset
    _cli("reconstruct", root / "p.zarr", "--out", tmp_path / "remote", "--scheduler",
         cluster.address)
    _cli("reconstruct", root / "p.zarr", "--out", tmp_path / "local", "--n-workers", "2")
    for remote, local in zip(_maps(tmp_path / "remote"), _maps(tmp_path / "local")):
        np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-5 * np.abs(local).max())


# ~45 s; the reconstruct-through-a-scheduler test runs by default
@pytest.mark.slow
def test_refine_on_a_real_cluster_with_workers_joining_and_leaving(cluster, dataset, tmp_path):
    """``refine --scheduler``: after the first iteration a third worker joins, after the second
    one of the first two leaves; the result is the embedded cluster's."""
    from distributed import Client

    root, store = dataset
    args = ["refine", root / "p.zarr", "--initial", root / "initial.mrc", "--max-iterations", "3"]
    remote_out = tmp_path / "remote"
    proc = subprocess.Popen([sys.executable, "-m", "dask_refine.ui.cli", *map(str, args),
                             "--out", str(remote_out), "--scheduler", cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counts = []
    with Client(cluster.address, timeout=30) as client:
        def wait_for(iteration):
            deadline = time.monotonic() + 300
            while not (remote_out / "iterations" / f"iter_{iteration:03d}").exists():
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline
                time.sleep(0.1)

        wait_for(1)
        cluster.workers.append(cluster.add_worker("joined"))
        client.wait_for_workers(3, timeout=60)
        counts.append(len(client.scheduler_info()["workers"]))
        wait_for(2)
        leaving = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "w0"]
        client.retire_workers(leaving, close_workers=True)
        counts.append(len(client.scheduler_info()["workers"]))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert counts == [3, 2]

    local = run_refine(RefineConfig(store=str(store.path), initial_map=str(root / "initial.mrc"),
                                    out_dir=str(tmp_path / "local"), max_iterations=3,
                                    cluster=ClusterConfig(n_workers=2)), log=lambda m: None)
    remote = json.loads((remote_out / "summary.json").read_text())
    assert remote["iterations"] == local["iterations"] == 3
    assert remote["resolution_A"] == pytest.approx(local["resolution_A"], rel=0.02)
    poses = [np.load(d / "iterations" / "iter_003" / "poses.npz")["rotation"]
             for d in (remote_out, tmp_path / "local")]
    same = np.all(np.abs(poses[0] - poses[1]) < 1e-6, axis=(1, 2))
    assert same.mean() >= 0.97, same.mean()
    a, b = _maps(remote_out)[2], _maps(tmp_path / "local")[2]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
