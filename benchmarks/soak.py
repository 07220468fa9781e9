"""Soak (issue 7, item 5): many iterations of the map-reduce on a store larger than each
worker's memory limit. Per iteration: wall time, peak worker RSS, bytes spilled to disk, and
the scheduler's task count once the iteration is done (must not grow).

What it runs: the jobs' own backprojection graph (``parallel.mapreduce.backproject_graph`` on the
store's zarr array, as ``jobs.reconstruct.compute_sums`` builds it) plus the M-step
(``reconstruct_halves_and_full``) on the client — the per-iteration map-reduce of a refinement
without its E-step search, which at these sizes would take hours per iteration on 2 cores.

    python benchmarks/soak.py                       # 20 iterations, 64k particles, box 64 (1 GB)
    python benchmarks/soak.py --iterations 5 --n 16000

Prints a table and writes benchmarks/results/soak.json. Stores are made once (in --work) by
tiling one simulated store (see scaling.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scaling import MemorySampler, base_store, cluster, tiled_store

HERE = Path(__file__).resolve().parent


def _spilled(dask_worker) -> int:
    total = getattr(dask_worker.data, "spilled_total", None)
    return int(getattr(total, "disk", 0) or 0) if total is not None else 0


def _n_tasks(dask_scheduler) -> int:
    return len(dask_scheduler.tasks)


def one_iteration(client, store) -> dict:
    from dask_refine.jobs.reconstruct import load_pose_metadata, reconstruct_halves_and_full
    from dask_refine.parallel.mapreduce import backproject_graph

    info = store.info
    n_threads = sum(client.nthreads().values())
    with MemorySampler(client) as mem:
        t0 = time.perf_counter()
        meta = load_pose_metadata(store, True)
        graph = backproject_graph(store.images, {k: v for k, v in meta.items()
                                                 if k != "half_set"},
                                  meta["half_set"].astype(np.int64), 2, info.pixel_size_A,
                                  n_chains=n_threads, source=str(store.path))
        sums = client.compute(graph).result()
        reconstruct_halves_and_full(sums, info.box_size, info.pixel_size_A)
        wall = time.perf_counter() - t0
        del sums
    peak = mem.summary()
    return {"wall_s": wall, "peak_worker_MiB": peak["max_worker_peak_MiB"],
            "client_peak_MiB": peak["client_peak_MiB"],
            "spilled_bytes": sum(client.run(_spilled).values()),
            "scheduler_tasks_after": client.run_on_scheduler(_n_tasks)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--n", type=int, default=64000, help="particles (default: %(default)s)")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="500MiB",
                   help="per worker; the store must be larger (default: %(default)s)")
    p.add_argument("--work", default=str(HERE / "results" / "scaling"))
    p.add_argument("--json", default=str(HERE / "results" / "soak.json"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    store = tiled_store(base_store(args.box, 4000, args.chunk, work, timings), args.n, work,
                        timings)
    store_mib = store.info.n_particles * store.info.box_size ** 2 * 4 / 2 ** 20
    limit_mib = float(args.memory_limit.removesuffix("MiB"))
    print(f"store {store.path}: {store_mib:.0f} MiB; {args.workers} workers × "
          f"{args.memory_limit} memory limit", flush=True)
    if store_mib <= limit_mib:
        raise SystemExit("the store must be larger than a worker's memory limit")
    c, client = cluster(args.workers, args.memory_limit)
    rows = []
    try:
        for it in range(1, args.iterations + 1):
            row = {"iteration": it, **one_iteration(client, store)}
            rows.append(row)
            print(f"  {it:3d}  {row['wall_s']:7.2f} s  peak worker {row['peak_worker_MiB']:6.0f} "
                  f"MiB  spilled {row['spilled_bytes'] / 2**20:6.1f} MiB  scheduler tasks "
                  f"{row['scheduler_tasks_after']}", flush=True)
    finally:
        client.close()
        c.close()
    peaks = [r["peak_worker_MiB"] for r in rows]
    half = max(1, len(rows) // 2)
    summary = {
        "n": args.n, "box": args.box, "store_MiB": store_mib, "workers": args.workers,
        "memory_limit": args.memory_limit, "iterations": len(rows),
        "wall_s_first_last": [rows[0]["wall_s"], rows[-1]["wall_s"]],
        "peak_worker_MiB_first_half_max": max(peaks[:half]),
        "peak_worker_MiB_second_half_max": max(peaks[half:]),
        "spilled_MiB_total": rows[-1]["spilled_bytes"] / 2 ** 20,
        "scheduler_tasks_after_each": [r["scheduler_tasks_after"] for r in rows],
        "rows": rows, "timings": timings,
    }
    print(f"\nsoak: {len(rows)} iterations, {args.n} particles (store {store_mib:.0f} MiB > "
          f"{args.memory_limit} per worker)")
    print(f"  peak worker RSS: first half ≤ {summary['peak_worker_MiB_first_half_max']:.0f} MiB, "
          f"second half ≤ {summary['peak_worker_MiB_second_half_max']:.0f} MiB")
    print(f"  spilled to disk: {summary['spilled_MiB_total']:.1f} MiB in all; scheduler tasks "
          f"after each iteration: {sorted(set(summary['scheduler_tasks_after_each']))}")
    print(f"  iteration time: first {rows[0]['wall_s']:.1f} s, last {rows[-1]['wall_s']:.1f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
