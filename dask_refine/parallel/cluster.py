"""Clusters: an embedded LocalCluster by default, or any running scheduler by address.

The embedded cluster binds its scheduler, workers and dashboard to loopback (127.0.0.1). Workers
are processes with one thread each by default: the NumPy kernels hold the GIL for part of their
work, so processes give the most throughput per core.
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


@contextlib.contextmanager
def dask_client(config: ClusterConfig = ClusterConfig()):
    """Yield a ``distributed.Client`` for ``config``; an embedded cluster is closed on exit."""
    from distributed import Client, LocalCluster

    if config.scheduler:
        security = None
        if config.tls_ca_file or config.tls_cert or config.tls_key:
            from distributed.security import Security

            security = Security(tls_ca_file=config.tls_ca_file, tls_client_cert=config.tls_cert,
                                tls_client_key=config.tls_key, require_encryption=True)
        client = Client(config.scheduler, security=security)
        try:
            yield client
        finally:
            client.close()
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
