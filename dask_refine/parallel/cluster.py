"""Clusters: an embedded LocalCluster by default, or any running scheduler by address.

The embedded cluster binds its scheduler, workers and dashboard to loopback (127.0.0.1). Workers
are processes with one thread each for jobs large enough to gain from them: the NumPy kernels hold
the GIL for part of their work, so processes give the most throughput per core. A small job
(``processes=None``, the default, and an estimate of its work below
:data:`IN_PROCESS_MAX_WORK_S`) runs the same graph on an in-process cluster of threads instead:
no worker processes to spawn and import into, no data to pickle between them
(``benchmarks/cold_start.py``; the threshold is measured in ``docs/benchmarks.md``).

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
    processes: bool | None = None  # None: processes unless the job is small (module docstring)
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


# Below this estimated work (seconds of one core) the embedded cluster is threads in this process:
# spawning worker processes, importing into them and pickling between them costs more than the
# GIL does (docs/benchmarks.md, "Cold start").
IN_PROCESS_MAX_WORK_S = 20.0


def reconstruction_work_s(n_particles: int, box_size: int) -> float:
    """One core's seconds to backproject ``n_particles`` images of ``box_size`` (measured: about
    1.4 ms per box-64 image, in proportion to the image's pixels)."""
    return n_particles * 1.4e-3 * (box_size / 64) ** 2


def refinement_work_s(n_particles: int, box_size: int, iterations: int) -> float:
    """One core's seconds for ``iterations`` refinement iterations (measured: about 0.1 s per
    box-64 particle and iteration, in proportion to the image's pixels)."""
    return n_particles * 0.1 * (box_size / 64) ** 2 * iterations


def use_processes(config: ClusterConfig, work_s: float | None) -> bool:
    """Whether the embedded CPU cluster of ``config`` is worker processes: as asked
    (``config.processes``, or any ``n_workers``/``threads_per_worker`` the user set), else for
    jobs whose estimated work ``work_s`` (one core's seconds; None: unknown) reaches
    :data:`IN_PROCESS_MAX_WORK_S`."""
    if config.processes is not None:
        return config.processes
    if config.n_workers is not None or config.threads_per_worker != 1:
        return True
    return work_s is None or work_s >= IN_PROCESS_MAX_WORK_S


def _cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@contextlib.contextmanager
def dask_client(config: ClusterConfig = ClusterConfig(), work_s: float | None = None):
    """Yield a ``distributed.Client`` for ``config``; an embedded cluster is closed on exit.
    ``work_s``: the job's estimated work in one core's seconds, which decides between worker
    processes and in-process threads when ``config`` leaves it open (:func:`use_processes`)."""
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
    if use_processes(config, work_s):
        cluster = LocalCluster(
            n_workers=config.n_workers or _cores(), threads_per_worker=config.threads_per_worker,
            processes=True, host="127.0.0.1", dashboard_address=config.dashboard_address,
            memory_limit=config.memory_limit)
    else:  # one worker in this process, a thread per core
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=(config.n_workers or _cores())
            * config.threads_per_worker, processes=False,  # in-process transport: no port
            dashboard_address=config.dashboard_address, memory_limit=config.memory_limit)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
