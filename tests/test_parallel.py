"""The Dask result equals the in-memory one, whatever the chunk size or worker count."""

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dask_refine.core.backprojection import FourierSums, backproject_particles
from dask_refine.io.simulate import SimulationConfig, simulate_store
from dask_refine.jobs.reconstruct import (ReconstructConfig, compute_sums, load_pose_metadata,
                                          run_reconstruct)
from dask_refine.io.store import ParticleStore
from dask_refine.parallel.mapreduce import tree_reduce


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_map):
    volume, px = demo_map
    path = tmp_path_factory.mktemp("par") / "p.zarr"
    return simulate_store(volume, px, path, SimulationConfig(n_particles=300, snr=0.2,
                                                             chunk_size=64), write_poses=True)


def _in_memory(store):
    meta = load_pose_metadata(store, True)
    sums = FourierSums.zeros(2, store.info.box_size)
    return backproject_particles(sums, store.images[:], meta, meta["half_set"],
                                 store.info.pixel_size_A)


def _assert_same(a, b):
    np.testing.assert_array_equal(a.count, b.count)
    for x, y in ((a.data, b.data), (a.weight, b.weight)):
        assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max()


@pytest.mark.parametrize("n_workers, chunk_size", [(1, 64), (2, 64), (2, 100)])
def test_dask_equals_in_memory(store, n_workers, chunk_size):
    reference = _in_memory(store)
    meta = load_pose_metadata(store, True)
    cfg = ReconstructConfig(store=str(store.path), out_dir="unused", chunk_size=chunk_size)
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        sums = compute_sums(store, meta, meta["half_set"].astype(int), 2, cfg, client)
    _assert_same(sums, reference)


def test_tree_reduce_shape():
    from dask import delayed

    parts = [delayed(lambda i=i: i)() for i in range(10)]
    total = tree_reduce(parts, lambda *xs: sum(xs), split_every=3)
    assert total.compute(scheduler="sync") == 45


def test_job_outputs_and_read_only_input(store, tmp_path):
    before = store.images[:5].copy()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        summary = run_reconstruct(ReconstructConfig(store=str(store.path), out_dir=str(tmp_path),
                                                    mask_diameter_A=100), client=client,
                                  log=lambda m: None)
    for name in ("half_A.mrc", "half_B.mrc", "map.mrc", "fsc.csv", "fsc.png", "summary.json",
                 "config.json"):
        assert (tmp_path / name).exists(), name
    assert summary["n_particles"] == 300 and sum(summary["n_particles_per_half"]) == 300
    assert 4.0 <= summary["resolution_A"] < 15.0
    np.testing.assert_array_equal(ParticleStore.open(store.path).images[:5], before)


def test_killing_a_worker_mid_reduction_does_not_change_the_result(tmp_path, demo_map):
    """A real SIGKILL of a worker process while the backprojection graph runs: the nanny
    restarts it, the scheduler recomputes the lost chunks, and the sums are unchanged."""
    import os
    import signal
    import time

    volume, px = demo_map
    big = simulate_store(volume, px, tmp_path / "big.zarr",
                         SimulationConfig(n_particles=1600, snr=0.2, chunk_size=400, seed=3),
                         write_poses=True)
    reference = _in_memory(big)
    meta = load_pose_metadata(big, True)
    cfg = ReconstructConfig(store=str(big.path), out_dir="unused", chunk_size=8, n_chains=4)
    from dask_refine.parallel.mapreduce import backproject_graph

    graph = backproject_graph(big.images, {k: v for k, v in meta.items() if k != "half_set"},
                              meta["half_set"].astype(int), 2, px, n_chains=cfg.n_chains,
                              chunk_size=8)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        future = client.compute(graph)

        def finished(dask_scheduler):  # accumulation steps done so far (kept or released)
            return sum(n for tg in dask_scheduler.task_groups.values()
                       if "accumulate" in tg.name
                       for state, n in tg.states.items() if state in ("memory", "released",
                                                                      "forgotten"))

        deadline = time.time() + 60
        while client.run_on_scheduler(finished) < 4 and time.time() < deadline:
            time.sleep(0.02)
        assert not future.done(), "the graph finished before the kill; make it larger"
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGKILL)
        sums = future.result(timeout=300)
        # the killed worker is gone (its nanny started a new one at another address)
        assert client.run_on_scheduler(lambda dask_scheduler: victim not in dask_scheduler.workers)
    _assert_same(sums, reference)


def test_tls_scheduler_with_our_cluster_config(tmp_path):
    """A tls:// scheduler is reached with the TLS files given on the command line."""
    from distributed.security import Security

    from dask_refine.parallel.cluster import ClusterConfig, dask_client

    sec = Security.temporary()  # in-memory CA, certificate and key (PEM text)
    files = {}
    for name, pem in (("ca", sec.tls_ca_file), ("cert", sec.tls_client_cert),
                      ("key", sec.tls_client_key)):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(pem)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      host="127.0.0.1", security=sec, dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1")
        cfg = ClusterConfig(scheduler=cluster.scheduler_address, tls_ca_file=str(files["ca"]),
                            tls_cert=str(files["cert"]), tls_key=str(files["key"]))
        with dask_client(cfg) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6


def test_embedded_cluster_binds_to_loopback():
    from dask_refine.parallel.cluster import ClusterConfig, dask_client

    with dask_client(ClusterConfig(n_workers=1)) as client:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
        assert client.dashboard_link.startswith("http://127.0.0.1:")


def test_reads_stay_at_most_one_chunk_ahead_of_each_chain(store):
    """Chunk reads are quick and backprojections slow: unbounded, the reads would all run first
    and the stack would pile up in worker memory. Each chain reads one chunk ahead at most."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    from dask_refine.parallel.mapreduce import backproject_graph

    class ReadsInMemory(SchedulerPlugin):
        def __init__(self):
            self.now = self.peak = 0

        def transition(self, key, start, finish, *args, **kwargs):
            if "read_rows" in str(key):
                self.now += (finish == "memory") - (start == "memory")
                self.peak = max(self.peak, self.now)

    meta = load_pose_metadata(store, True)
    n_chains, chunk = 2, 8
    graph = backproject_graph(store.images, {k: v for k, v in meta.items() if k != "half_set"},
                              meta["half_set"].astype(int), 2, store.info.pixel_size_A,
                              n_chains=n_chains, chunk_size=chunk)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        plugin = ReadsInMemory()
        cluster.scheduler.add_plugin(plugin)
        sums = client.compute(graph).result()
    assert store.info.n_particles // chunk >= 30
    assert 1 <= plugin.peak <= 2 * n_chains, plugin.peak
    _assert_same(sums, _in_memory(store))


def test_balanced_blocks_give_every_chain_the_same_rows():
    from dask_refine.parallel.mapreduce import balanced_bounds

    for n, chunk, chains in [(300, 100, 2), (1000, 100, 2), (97, 24, 3), (5, 100, 4), (3, 100, 4),
                             (1, 1, 2)]:
        rows = np.diff(balanced_bounds(n, chunk, chains))
        assert rows.sum() == n and rows.max() <= chunk and rows.max() - rows.min() <= 1
        assert rows.size % chains == 0 or rows.size == n < chains, (n, chunk, chains, rows)
    assert np.diff(balanced_bounds(300, 100, 2)).tolist() == [75] * 4  # not 100, 100 | 100


def test_small_jobs_run_on_threads_in_this_process_large_ones_on_processes():
    """The embedded cluster's kind (``use_processes``): what the user asked for, else threads
    below the work threshold; the in-process cluster runs a graph like any other."""
    import os

    from dask_refine.parallel.cluster import (IN_PROCESS_MAX_WORK_S, ClusterConfig, dask_client,
                                              reconstruction_work_s, refinement_work_s,
                                              use_processes)

    auto = ClusterConfig()
    assert not use_processes(auto, 0.5 * IN_PROCESS_MAX_WORK_S)
    assert use_processes(auto, IN_PROCESS_MAX_WORK_S) and use_processes(auto, None)
    assert use_processes(ClusterConfig(n_workers=2), 0.0)  # worker count asked: processes
    assert not use_processes(ClusterConfig(processes=False), 1e9)
    assert use_processes(ClusterConfig(processes=True), 0.0)
    assert reconstruction_work_s(1500, 64) < IN_PROCESS_MAX_WORK_S  # the cold-start case
    assert refinement_work_s(3000, 64, 15) > IN_PROCESS_MAX_WORK_S
    assert reconstruction_work_s(1000, 128) == 4 * reconstruction_work_s(1000, 64)
    with dask_client(ClusterConfig(dashboard_address=None), work_s=1.0) as client:
        assert client.cluster.processes is False
        assert sum(client.nthreads().values()) == len(os.sched_getaffinity(0))
        assert client.submit(sum, [1, 2, 3]).result() == 6
