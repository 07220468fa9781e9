"""Clusters: an embedded LocalCluster by default, or any running scheduler by address.

The embedded cluster binds its scheduler, workers and dashboard to loopback (127.0.0.1). Workers
are processes with one thread each by default: the NumPy kernels hold the GIL for part of their
work, so processes give the most throughput per core.

GPU (``gpu=True``): the embedded cluster is dask-cuda's ``LocalCUDACluster``, one worker process
per visible GPU (``CUDA_VISIBLE_DEVICES`` is honoured: dask-cuda reads it and pins each worker to
one of the listed devices), each with a device-memory limit beyond which dask-cuda spills to host
memory; the map tasks then run on CuPy (``backend == "cupy"``). With a ``scheduler`` address the
workers must already be GPU workers (``dask cuda worker``, or dask-kubernetes / dask-jobqueue
recipes in ``deploy/``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterConfig:
    """Where to run. ``scheduler``: address of a running scheduler (``tcp://host:8786``) or None for
    an embedded LocalCluster of ``n_workers`` processes (default: one per core). For a
    ``tls://`` scheduler, ``tls_ca_file``/``tls_cert``/``tls_key`` are the client's TLS files
    (Dask's ``distributed.Security``); without them Dask's own ``distributed.comm.tls``
    configuration applies."""

    scheduler: str | None = None
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    dashboard_address: str | None = "127.0.0.1:0"
    gpu: bool = False
    device_memory_limit: str = "0.8"  # per GPU worker: a fraction of the device, or "40GB"

    @property
    def backend(self) -> str:
        """The array backend of the map tasks: ``"cupy"`` on GPU workers, else ``"numpy"``."""
        return "cupy" if self.gpu else "numpy"


class GPUUnavailable(RuntimeError):
    """``--gpu`` was asked for where CuPy, dask-cuda or a CUDA device is missing."""


def gpu_problem(need_dask_cuda: bool = True) -> str | None:
    """Why this process cannot run the GPU backend (a missing package with its install command,
    or no usable CUDA device), or None when it can."""
    try:
        import cupy
        if need_dask_cuda:
            import dask_cuda  # noqa: F401
    except ImportError as exc:
        return (f"--gpu needs CuPy and dask-cuda ({exc.name} is not installed): "
                "pip install 'dask-refine[gpu]'")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no CUDA driver, or a broken one
        return f"--gpu: CuPy cannot use a CUDA device ({exc})"
    if n == 0:
        return "--gpu: no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
    return None


def _worker_gpu_problem() -> str | None:
    return gpu_problem(need_dask_cuda=False)


def check_workers_gpu(client) -> None:
    """Raise :class:`GPUUnavailable` naming the workers of a running cluster that cannot run
    the GPU backend (``--gpu`` with ``--scheduler``: the driver itself needs no GPU)."""
    problems = {w: p for w, p in client.run(_worker_gpu_problem).items() if p}
    if problems:
        worker, problem = next(iter(problems.items()))
        raise GPUUnavailable(f"{len(problems)} of {len(client.scheduler_info()['workers'])} "
                             f"workers cannot run on a GPU, e.g. {worker}: {problem}")


def cuda_cluster_kwargs(config: "ClusterConfig") -> dict:
    """Keyword arguments of dask-cuda's ``LocalCUDACluster`` for ``config``: one single-threaded
    worker per visible GPU (``CUDA_VISIBLE_DEVICES`` when set, else every device), the
    device-memory limit, loopback addresses."""
    kwargs = dict(host="127.0.0.1", dashboard_address=config.dashboard_address,
                  threads_per_worker=config.threads_per_worker,
                  device_memory_limit=config.device_memory_limit,
                  memory_limit=config.memory_limit)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        kwargs["CUDA_VISIBLE_DEVICES"] = visible
    if config.n_workers:
        kwargs["n_workers"] = config.n_workers
    return kwargs


@contextlib.contextmanager
def dask_client(config: ClusterConfig = ClusterConfig()):
    """Yield a ``distributed.Client`` for ``config``; an embedded cluster is closed on exit."""
    from distributed import Client, LocalCluster

    if config.gpu and not config.scheduler:
        problem = gpu_problem()
        if problem:
            raise GPUUnavailable(problem)

    if config.scheduler:
        security = None
        if config.tls_ca_file or config.tls_cert or config.tls_key:
            from distributed.security import Security

            security = Security(tls_ca_file=config.tls_ca_file, tls_client_cert=config.tls_cert,
                                tls_client_key=config.tls_key, require_encryption=True)
        client = Client(config.scheduler, security=security)
        try:
            if config.gpu:
                check_workers_gpu(client)
            yield client
        finally:
            client.close()
        return
    if config.gpu:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(**cuda_cluster_kwargs(config))
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    n_workers = config.n_workers or max(1, len(os.sched_getaffinity(0)))
    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=config.threads_per_worker, processes=True,
        host="127.0.0.1", dashboard_address=config.dashboard_address,
        memory_limit=config.memory_limit,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
