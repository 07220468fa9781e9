"""Scaling benchmark (issue 6, item 5): per-iteration cost vs particle count and worker count,
Dask overhead, bytes moved by the reduction, peak worker memory.

Measures, on LocalClusters of W processes × 1 thread (a fresh cluster per measurement, so each
worker's memory starts clean; the Numba kernels are warmed on a 64-particle store first):
  * reconstruction (the M-step map-reduce: read chunks → backproject into per-chain Fourier sums
    → tree-reduce), at box ``--box`` for N in ``--recon-n``; and the client-side M-step
    (half maps, FSC, Wiener-filtered full map) from the reduced sums;
  * Homogeneous Refinement (``run_refine``, ``--refine-iterations`` iterations: global first
    iterations, local last) at box ``--refine-box`` for N in ``--refine-n``; per-iteration time
    from the run's ``iterations.csv``;
  * 1 vs 2 workers for the reconstruction at ``--workers-n`` and the refinement at
    ``--workers-refine-n`` (this machine has 2 cores: 2 workers is the whole machine);
  * Dask overhead from the task stream: Σ task compute time vs wall × threads, tasks per
    iteration, graph build and submit times on the client;
  * bytes moved: the per-chain partial sums (FourierSums data + weight, 2 half sets, padded box)
    × transfers, against the workers' own counters (``transfer_outgoing_log``: to peer workers
    = the reduction, to the client = the result);
  * peak RSS per worker (sampled every ``--sample-s`` with ``client.run``) and of the client;
  * the client-side M-step alone at ``--mstep-boxes`` (synthetic sums; no particles needed).

Big stores are tiled: ``--base-n`` particles are simulated once per box and their chunks written
again with ``ParticleStore.create`` + ``write_images`` + the same columns (the tiled particles are
duplicates, which costs exactly what distinct ones cost).

Results: a table on stdout and ``benchmarks/results/scaling.json``.

    nice -n 19 python benchmarks/scaling.py                       # ~ 11 min on 2 cores
    # 1-vs-2-worker refinement with 4 chunks per run, repeat of the big reconstructions:
    nice -n 19 python benchmarks/scaling.py --recon-n 16000 64000 --refine-n 500 \
        --refine-chunk 125 --mstep-boxes --json benchmarks/results/scaling_run2.json
    nice -n 19 python benchmarks/scaling.py --recon-n 1000 --read-in-task-n 1000 --refine-n \
        --workers-n 0 --workers-refine-n 0 --mstep-boxes 64          # smoke test, ~1 min

See docs/scaling.md for the measured tables and the extrapolation built on them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MAP64 = REPO / "dask_refine" / "data" / "1tii_64_2.0.mrc"


# ----------------------------------------------------------------------------- stores
def truth_map(box: int):
    from dask_refine.core.fourier import fourier_downsample
    from dask_refine.io.mrc import read_map

    vol, px = read_map(MAP64)
    if box == vol.shape[0]:
        return vol, px
    if box > vol.shape[0]:
        raise SystemExit(f"box {box}: only boxes ≤ {vol.shape[0]} are built from {MAP64}")
    return fourier_downsample(vol, box), px * vol.shape[0] / box


def base_store(box: int, n: int, chunk: int, work: Path, timings: dict):
    """Simulated store of ``n`` particles at ``box`` (made once, reused)."""
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.store import ParticleStore

    path = work / f"base_box{box}_n{n}_c{chunk}.zarr"
    if path.exists():
        return ParticleStore.open(path)
    vol, px = truth_map(box)
    t0 = time.perf_counter()
    store = simulate_store(vol, px, path, SimulationConfig(n_particles=n, snr=0.1,
                                                           chunk_size=chunk),
                           write_poses=True, source=f"{MAP64} (box {box})")
    dt = time.perf_counter() - t0
    timings[f"simulate_box{box}_n{n}"] = {"s": dt, "particles_per_s": n / dt}
    print(f"  simulated {n} particles at box {box} in {dt:.1f} s ({n / dt:.0f}/s)", flush=True)
    return store


def tiled_store(base, n: int, work: Path, timings: dict):
    """A store of ``n`` particles made of copies of ``base`` (chunks written again)."""
    from dask_refine.io.store import GROUND_TRUTH, ParticleStore

    info = base.info
    if n == info.n_particles:
        return base
    path = work / f"tiled_box{info.box_size}_n{n}_c{info.chunk_size}.zarr"
    if path.exists():
        return ParticleStore.open(path)
    assert info.n_particles % info.chunk_size == 0, "base store must hold whole chunks"
    t0 = time.perf_counter()
    attrs = base.attrs
    store = ParticleStore.create(path, n, info.box_size, info.pixel_size_A, info.chunk_size,
                                 optics=attrs.get("optics"),
                                 provenance={**attrs.get("provenance", {}),
                                             "tiled_from": str(base.path)})
    images = np.asarray(base.images[:])
    nb = info.n_particles
    for start in range(0, n, nb):
        store.write_images(start, images[:min(nb, n - start)])
    reps = math.ceil(n / nb)
    for group in (None, GROUND_TRUTH):
        for name in base.columns(group):
            col = base.read_column(name, group)
            store.write_column(name, np.concatenate([col] * reps)[:n], group=group)
    dt = time.perf_counter() - t0
    timings[f"tile_box{info.box_size}_n{n}"] = {"s": dt}
    print(f"  tiled {n} particles at box {info.box_size} in {dt:.1f} s", flush=True)
    return ParticleStore.open(path)


# ----------------------------------------------------------------------------- instruments
def _rss():
    import psutil

    return psutil.Process().memory_info().rss


class MemorySampler:
    """RSS of every worker (``client.run``) and of this process, every ``period`` seconds."""

    def __init__(self, client, period: float = 0.5):
        self.client, self.period = client, period
        self.samples: list[tuple[float, dict, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        import psutil

        try:
            workers = self.client.run(_rss)
        except Exception:  # a worker busy in the GIL can miss one sample
            workers = {}
        self.samples.append((time.perf_counter(), workers, psutil.Process().memory_info().rss))

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._sample()
        self.baseline = dict(self.samples[0][1])
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict:
        peak: dict[str, int] = {}
        for _, workers, _ in self.samples:
            for w, r in workers.items():
                peak[w] = max(peak.get(w, 0), r)
        mib = 2 ** 20
        return {
            "n_samples": len(self.samples),
            "worker_baseline_MiB": {w: r / mib for w, r in self.baseline.items()},
            "worker_peak_MiB": {w: r / mib for w, r in peak.items()},
            "max_worker_peak_MiB": max(peak.values(), default=0) / mib,
            "max_worker_growth_MiB": max((peak[w] - self.baseline.get(w, peak[w])
                                          for w in peak), default=0) / mib,
            "client_peak_MiB": max(s[2] for s in self.samples) / mib,
        }


def _transfer_log(dask_worker):
    from distributed.utils import key_split

    return {"total": dask_worker.transfer_outgoing_bytes_total,
            "log": [{"who": e.get("who"), "total": e.get("total"),
                     "keys": [key_split(k) for k in e.get("keys", {})]}
                    for e in dask_worker.transfer_outgoing_log]}


# task prefixes whose output is a FourierSums (or a (sums, poses) state): Dask's sizeof does not
# know that type and counts it as ~56 bytes, so these transfers are counted here by number
SUMS_PREFIXES = ("accumulate", "read_accumulate", "sum", "refine_accumulate", "refine_combine")


class TransferCounter:
    """Bytes the workers sent (``get_data``), split into to-peer-workers and to-the-client."""

    def __init__(self, client, sums_bytes: int):
        self.client, self.sums_bytes = client, sums_bytes

    def __enter__(self):
        self.before = self.client.run(_transfer_log)
        return self

    def __exit__(self, *exc):
        after = self.client.run(_transfer_log)
        workers = set(after)
        to_workers = to_client = n_worker = n_client = 0
        sums_to_workers = sums_to_client = 0
        image_bytes = image_transfers = 0
        for w, a in after.items():
            new = a["log"][len(self.before.get(w, {"log": []})["log"]):]
            for e in new:
                n_sums = sum(k in SUMS_PREFIXES for k in e["keys"])
                n_img = sum(k == "from-zarr" for k in e["keys"])
                if e["who"] in workers:
                    to_workers += e["total"] or 0
                    n_worker += 1
                    sums_to_workers += n_sums
                    if n_img:
                        image_transfers += n_img
                        image_bytes += e["total"] or 0
                else:
                    to_client += e["total"] or 0
                    n_client += 1
                    sums_to_client += n_sums
        self.result = {
            "outgoing_bytes_total": sum(a["total"] - self.before.get(w, {"total": 0})["total"]
                                        for w, a in after.items()),
            "to_workers_bytes": to_workers, "to_workers_transfers": n_worker,
            "to_client_bytes": to_client, "to_client_transfers": n_client,
            "sums_transfers_to_workers": sums_to_workers,
            "sums_transfers_to_client": sums_to_client,
            "sums_bytes_to_workers": sums_to_workers * self.sums_bytes,
            "image_chunk_transfers": image_transfers, "image_chunk_bytes": image_bytes,
            "note": "byte totals are Dask's sizeof estimates; FourierSums counts as ~56 B there, "
                    "so sums_bytes_to_workers = transfers × the real size"}


def task_stream_summary(records, wall_s: float, n_threads: int) -> dict:
    """Σ compute / transfer per task prefix, and the part of wall × threads not computing."""
    from distributed.utils import key_split

    by: dict[str, dict] = {}
    compute = transfer = other = 0.0
    for r in records:
        name = key_split(r["key"])
        d = by.setdefault(name, {"n": 0, "compute_s": 0.0})
        d["n"] += 1
        for ss in r.get("startstops", ()):
            dt = ss["stop"] - ss["start"]
            if ss["action"] == "compute":
                compute += dt
                d["compute_s"] += dt
            elif ss["action"] == "transfer":
                transfer += dt
            else:
                other += dt
    capacity = wall_s * n_threads
    return {"n_tasks": len(records), "by_prefix": by, "compute_s": compute,
            "transfer_s": transfer, "other_s": other, "capacity_s": capacity,
            "compute_fraction": compute / capacity if capacity else float("nan"),
            "not_computing_s": capacity - compute,
            "overhead_per_task_ms": 1e3 * (capacity - compute) / max(1, len(records))}


def cluster(n_workers: int, memory_limit: str):
    from distributed import Client, LocalCluster

    c = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                     dashboard_address=None, memory_limit=memory_limit)
    return c, Client(c)


def sized_store(base, n: int, work: Path, timings: dict):
    """``base`` tiled up to ``n`` particles, or its first ``n``."""
    if n > base.info.n_particles:
        return tiled_store(base, n, work, timings)
    return _head(base, n, work, timings)


def warm(client, store_warm):
    """Import and JIT the kernels on every worker, and run one tiny map-reduce."""
    client.run(lambda: __import__("dask_refine.core._numba_kernels"))
    recon_once(client, store_warm, instrument=False)


# ----------------------------------------------------------------------------- measurements
def _read_accumulate(sums, images_zarr, start, stop, meta, groups, *extra):
    """The job's accumulate task, reading its own chunk (no separate from-zarr task)."""
    from dask_refine.parallel.mapreduce import _accumulate

    return _accumulate(sums, images_zarr[start:stop], meta, groups, *extra)


def read_in_task_graph(store, meta, groups, n_chains: int, split_every: int):
    """Variant of ``backproject_graph`` where each chain task reads its chunk itself. In the
    job's graph the chunk reads are separate root tasks; the scheduler's queuing limits
    *processing* tasks, not finished ones, so cheap reads run ahead of the slow accumulate chains
    and their chunks pile up in worker memory (and get copied between workers). Reading inside
    the task bounds a worker to the chunk it is working on."""
    from dask import delayed

    from dask_refine.parallel.mapreduce import _sum, tree_reduce

    info = store.info
    arr = store.images
    extra = (2, info.box_size, 2, info.pixel_size_A, True, None, "numpy", str(store.path))
    starts = list(range(0, info.n_particles, info.chunk_size))
    n_chains = max(1, min(n_chains, len(starts)))
    chains = [None] * n_chains
    acc = delayed(_read_accumulate)
    for i, start in enumerate(starts):
        rows = slice(start, min(start + info.chunk_size, info.n_particles))
        c = i % n_chains
        chains[c] = acc(chains[c], arr, rows.start, rows.stop,
                        {k: v[rows] for k, v in meta.items()}, groups[rows], *extra, rows.start)
    return tree_reduce(chains, _sum, split_every)


def recon_once(client, store, instrument=True, split_every=4, read_in_task=False) -> dict:
    from distributed import get_task_stream

    from dask_refine.core.backprojection import FourierSums
    from dask_refine.jobs.reconstruct import load_pose_metadata, reconstruct_halves_and_full
    from dask_refine.parallel.mapreduce import backproject_graph

    info = store.info
    n_threads = sum(client.nthreads().values())
    t0 = time.perf_counter()
    meta = load_pose_metadata(store, True)
    groups = meta["half_set"].astype(np.int64)
    t_meta = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = store.images  # the jobs pass the zarr array: gated reads (parallel.mapreduce)
    if read_in_task:
        graph = read_in_task_graph(store, {k: v for k, v in meta.items() if k != "half_set"},
                                   groups, n_threads, split_every)
    else:
        graph = backproject_graph(images, {k: v for k, v in meta.items() if k != "half_set"},
                                  groups, 2, info.pixel_size_A, n_chains=n_threads,
                                  split_every=split_every, source=str(store.path))
    t_build = time.perf_counter() - t0
    if not instrument:
        client.compute(graph).result()
        return {}
    sums_bytes = FourierSums.zeros(2, info.box_size).nbytes
    with get_task_stream(client) as ts, MemorySampler(client) as mem, \
            TransferCounter(client, sums_bytes) as tr:
        t0 = time.perf_counter()
        future = client.compute(graph)
        t_submit = time.perf_counter() - t0
        sums = future.result()
        t_compute = time.perf_counter() - t0
    t0 = time.perf_counter()
    reconstruct_halves_and_full(sums, info.box_size, info.pixel_size_A)
    t_mstep = time.perf_counter() - t0
    n = info.n_particles
    n_chunks = -(-info.n_particles // info.chunk_size)
    n_chains = max(1, min(n_threads, n_chunks))
    ts_sum = task_stream_summary(ts.data, t_compute, n_threads)
    n_reduce = ts_sum["by_prefix"].get("sum", {}).get("n", 0)
    return {
        "n": n, "box": info.box_size, "workers": len(client.nthreads()), "threads": n_threads,
        "graph": "read-in-task" if read_in_task else "job", "chunk": info.chunk_size, "n_chunks": n_chunks, "n_chains": n_chains,
        "meta_load_s": t_meta, "graph_build_s": t_build, "submit_s": t_submit,
        "map_reduce_s": t_compute, "mstep_client_s": t_mstep,
        "iteration_s": t_meta + t_build + t_compute + t_mstep,
        "particles_per_s": n / t_compute,
        "core_s_per_particle": t_compute * n_threads / n,
        "task_stream": ts_sum,
        "reduction": {
            "sums_bytes_per_chain": sums_bytes, "n_reduce_tasks": n_reduce,
            # chains whose sums must cross to the worker that runs their reduce task: at most
            # n_chains − 1 (one chain is local), plus the result to the client
            "expected_peer_bytes_max": (n_chains - 1) * sums_bytes if n_chains > 1 else 0,
            "expected_client_bytes": sums_bytes,
            "measured": tr.result},
        "memory": mem.summary(),
    }


def refine_once(client, store, initial: Path, out: Path, iterations: int,
                chunk: int | None = None) -> dict:
    from distributed import get_task_stream

    from dask_refine.core.backprojection import FourierSums
    from dask_refine.jobs.refine import RefineConfig, run_refine

    shutil.rmtree(out, ignore_errors=True)
    n_threads = sum(client.nthreads().values())
    sums_bytes = FourierSums.zeros(2, store.info.box_size).nbytes
    with get_task_stream(client) as ts, MemorySampler(client) as mem, \
            TransferCounter(client, sums_bytes) as tr:
        t0 = time.perf_counter()
        run_refine(RefineConfig(store=str(store.path), initial_map=str(initial),
                                out_dir=str(out), max_iterations=iterations,
                                patience=iterations + 1, chunk_size=chunk),
                   client=client, log=lambda *a, **k: None)
        wall = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "iterations.csv")))
    per_it = [{"iteration": int(r["iteration"]), "local": bool(int(r["local_search"])),
               "level": int(r["search_level"]), "time_s": float(r["time_s"]),
               "particles_per_s": float(r["particles_per_s"]),
               "mean_pose_evaluations": float(r["mean_pose_evaluations"]),
               "align_to_shell": float(r["align_to_shell"]),
               "resolution_A": float(r["resolution_A"])} for r in rows]
    n = store.info.n_particles
    for r in per_it:
        r["core_s_per_particle"] = r["time_s"] * n_threads / n
        r["core_us_per_evaluation"] = 1e6 * r["core_s_per_particle"] / r["mean_pose_evaluations"]
    ts_sum = task_stream_summary(ts.data, sum(r["time_s"] for r in per_it), n_threads)
    return {"n": n, "box": store.info.box_size, "workers": len(client.nthreads()),
            "threads": n_threads, "chunk": chunk or store.info.chunk_size,
            "n_chunks": math.ceil(n / (chunk or store.info.chunk_size)), "wall_s": wall,
            "iterations": per_it,
            "first_global": per_it[0], "last_local": per_it[-1],
            "non_estep_s": wall - sum(r["time_s"] for r in per_it),
            "task_stream": ts_sum,
            "reduction": {"sums_bytes_per_chain": sums_bytes,
                          "measured": tr.result},
            "memory": mem.summary()}


def mstep_alone(box: int) -> dict:
    """Client-side M-step from synthetic sums at ``box`` (no particles): reconstruct 2 halves,
    FSC, full map; and one in-place sum of two chains' sums (a reduce task's work)."""
    from dask_refine.core.backprojection import FourierSums
    from dask_refine.jobs.reconstruct import reconstruct_halves_and_full

    rng = np.random.default_rng(0)
    s = FourierSums.zeros(2, box)
    s.data.real[...] = rng.standard_normal(s.data.shape, dtype=np.float32)
    s.weight[...] = 1.0 + rng.random(s.weight.shape, dtype=np.float32)
    s.count[:] = 1000
    other = FourierSums(s.data.copy(), s.weight.copy(), s.count.copy())
    t0 = time.perf_counter()
    other.add_(s)
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    reconstruct_halves_and_full(s, box, 1.0)
    return {"box": box, "sums_bytes": s.nbytes, "add_s": t_add,
            "reconstruct_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=64, help="reconstruction box")
    p.add_argument("--recon-n", type=int, nargs="*", default=[1000, 4000, 16000, 64000])
    p.add_argument("--read-in-task-n", type=int, nargs="*", default=[16000, 64000],
                   help="also run the read-in-task graph variant at these N (memory check)")
    p.add_argument("--refine-box", type=int, default=32)
    p.add_argument("--refine-n", type=int, nargs="*", default=[500, 2000])
    p.add_argument("--refine-iterations", type=int, default=3)
    p.add_argument("--refine-chunk", type=int, default=None,
                   help="particles per refinement task (default: the store's chunk); use "
                        "N / 4 or less so that 2 workers get 2 chains")
    p.add_argument("--workers-n", type=int, default=16000,
                   help="reconstruction N for the 1-vs-2-worker comparison (0: skip)")
    p.add_argument("--workers-refine-n", type=int, default=500,
                   help="refinement N for the 1-vs-2-worker comparison (0: skip)")
    p.add_argument("--mstep-boxes", type=int, nargs="*", default=[64, 128])
    p.add_argument("--base-n", type=int, default=4000)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="8GiB", help="per worker")
    p.add_argument("--work", default=str(HERE / "results" / "scaling"))
    p.add_argument("--json", default=str(HERE / "results" / "scaling.json"))
    p.add_argument("--keep", action="store_true", help="keep the stores in --work")
    args = p.parse_args()

    import os

    import dask
    import distributed

    from dask_refine.io.mrc import write_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"_meta": {"cores": len(os.sched_getaffinity(0)), "dask": dask.__version__,
                           "distributed": distributed.__version__, "args": vars(args),
                           "date": time.strftime("%Y-%m-%d %H:%M")},
                 "setup": {}, "recon": [], "recon_read_in_task": [], "refine": [], "workers": {}, "mstep": []}
    t_all = time.perf_counter()

    def save():
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        res["_meta"]["total_s"] = time.perf_counter() - t_all
        out.write_text(json.dumps(res, indent=2, default=float))

    warm_stores = {}

    def warm_store(box):
        if box not in warm_stores:
            vol, px = truth_map(box)
            path = work / f"warm_box{box}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            warm_stores[box] = simulate_store(vol, px, path,
                                              SimulationConfig(n_particles=64, chunk_size=32),
                                              write_poses=True)
        return warm_stores[box]

    def on_fresh_cluster(n_workers, memory_limit, box, run):
        """``run(client)`` on a new cluster, warmed up at ``box``; closed afterwards."""
        c, client = cluster(n_workers, memory_limit)
        try:
            warm(client, warm_store(box))
            return run(client)
        finally:
            client.close()
            c.close()

    # --- reconstruction vs N
    if args.recon_n:
        print(f"reconstruction, box {args.box}", flush=True)
        base = base_store(args.box, min(args.base_n, max(args.recon_n)), args.chunk, work,
                          res["setup"])
        for n in args.recon_n:
            store = sized_store(base, n, work, res["setup"])
            r = on_fresh_cluster(args.workers, args.memory_limit, args.box,
                                      lambda client: recon_once(client, store))
            res["recon"].append(r)
            print(f"  N={n:6d}: map-reduce {r['map_reduce_s']:.2f} s "
                  f"({r['particles_per_s']:.0f}/s), M-step {r['mstep_client_s']:.2f} s, "
                  f"{r['task_stream']['n_tasks']} tasks, peak worker "
                  f"{r['memory']['max_worker_peak_MiB']:.0f} MiB", flush=True)
            save()

    # --- the read-in-task variant (same stores)
    if args.read_in_task_n:
        print(f"reconstruction, box {args.box}, read-in-task graph variant", flush=True)
        base = base_store(args.box, min(args.base_n, max(args.read_in_task_n)), args.chunk, work,
                          res["setup"])
        for n in args.read_in_task_n:
            store = sized_store(base, n, work, res["setup"])
            r = on_fresh_cluster(args.workers, args.memory_limit, args.box,
                                      lambda client: recon_once(client, store, read_in_task=True))
            res["recon_read_in_task"].append(r)
            print(f"  N={n:6d}: map-reduce {r['map_reduce_s']:.2f} s "
                  f"({r['particles_per_s']:.0f}/s), peak worker "
                  f"{r['memory']['max_worker_peak_MiB']:.0f} MiB", flush=True)
            save()

    # --- refinement vs N
    if args.refine_n:
        print(f"refinement, box {args.refine_box}, {args.refine_iterations} iterations",
              flush=True)
        vol, px = truth_map(args.refine_box)
        initial = work / f"initial_box{args.refine_box}.mrc"
        write_map(initial, vol, px)
        base = base_store(args.refine_box, min(args.base_n, max(args.refine_n)), args.chunk,
                          work, res["setup"])
        for n in args.refine_n:
            store = sized_store(base, n, work, res["setup"])
            r = on_fresh_cluster(args.workers, args.memory_limit, args.refine_box,
                                      lambda client: refine_once(client, store, initial, work / f"refine_n{n}",
                                args.refine_iterations, args.refine_chunk))
            res["refine"].append(r)
            print(f"  N={n:6d}: global it 1 {r['first_global']['time_s']:.1f} s, local it "
                  f"{r['last_local']['iteration']} {r['last_local']['time_s']:.1f} s "
                  f"({r['last_local']['particles_per_s']:.0f}/s), peak worker "
                  f"{r['memory']['max_worker_peak_MiB']:.0f} MiB", flush=True)
            save()

    # --- 1 vs 2 workers
    if args.workers_n:
        print(f"reconstruction N={args.workers_n}: 1 worker", flush=True)
        base = base_store(args.box, min(args.base_n, args.workers_n), args.chunk, work,
                          res["setup"])
        store = tiled_store(base, args.workers_n, work, res["setup"]) \
            if args.workers_n > base.info.n_particles else base
        res["workers"]["recon_1"] = on_fresh_cluster(1, args.memory_limit, args.box,
                                                     lambda client: recon_once(client, store))
        two = next((r for r in res["recon"] if r["n"] == args.workers_n
                    and r["workers"] == 2), None)
        if two is None:
            two = on_fresh_cluster(2, args.memory_limit, args.box,
                                      lambda client: recon_once(client, store))
        res["workers"]["recon_2"] = two
        save()
    if args.workers_refine_n:
        print(f"refinement N={args.workers_refine_n}: 1 worker", flush=True)
        vol, px = truth_map(args.refine_box)
        initial = work / f"initial_box{args.refine_box}.mrc"
        write_map(initial, vol, px)
        base = base_store(args.refine_box, min(args.base_n, max(args.refine_n or [args.base_n])),
                          args.chunk, work, res["setup"])
        store = sized_store(base, args.workers_refine_n, work, res["setup"])
        res["workers"]["refine_1"] = on_fresh_cluster(
            1, args.memory_limit, args.refine_box,
            lambda client: refine_once(client, store, initial, work / "refine_1worker",
                                       args.refine_iterations, args.refine_chunk))
        res["workers"]["refine_2"] = next((r for r in res["refine"]
                                           if r["n"] == args.workers_refine_n), None)
        save()

    # --- M-step alone at larger boxes
    for box in args.mstep_boxes:
        print(f"client-side M-step, box {box}", flush=True)
        res["mstep"].append(mstep_alone(box))
        save()

    print_tables(res)
    save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.json}")


def _head(base, n: int, work: Path, timings: dict):
    """The first ``n`` particles of ``base`` as their own store (n ≤ base size)."""
    if n == base.info.n_particles:
        return base
    from dask_refine.io.store import GROUND_TRUTH, ParticleStore

    info = base.info
    path = work / f"head_box{info.box_size}_n{n}_c{info.chunk_size}.zarr"
    if path.exists():
        return ParticleStore.open(path)
    store = ParticleStore.create(path, n, info.box_size, info.pixel_size_A, info.chunk_size,
                                 optics=base.attrs.get("optics"),
                                 provenance={**base.attrs.get("provenance", {}),
                                             "head_of": str(base.path)})
    store.write_images(0, np.asarray(base.images[:n]))
    for group in (None, GROUND_TRUTH):
        for name in base.columns(group):
            store.write_column(name, base.read_column(name, group)[:n], group=group)
    return ParticleStore.open(path)


def print_tables(res: dict) -> None:
    m = res["_meta"]
    print(f"\nScaling, {m['cores']} cores, distributed {m['distributed']}, {m['date']}")
    rec = res["recon"] + res["recon_read_in_task"] + (
        [res["workers"]["recon_1"]] if res["workers"].get("recon_1") else [])
    if rec:
        print("\nReconstruction map-reduce (M-step) vs N (graph: job, or read-in-task variant)")
        print(f"{'N':>6s} {'box':>4s} {'W':>2s} {'graph':>5s} {'tasks':>5s} {'build s':>7s} {'submit s':>8s} "
              f"{'m-r s':>7s} {'img/s':>6s} {'core ms/img':>11s} {'Mstep s':>7s} "
              f"{'busy %':>6s} {'sums→w':>6s} {'sums MB':>7s} {'img→w MB':>8s} {'peak MiB':>8s} "
              f"{'grow MiB':>8s}")
        for r in rec:
            tr = r["reduction"]["measured"]
            print(f"{r['n']:6d} {r['box']:4d} {r['workers']:2d} {r['graph'][:5]:>5s} "
                  f"{r['task_stream']['n_tasks']:5d} "
                  f"{r['graph_build_s']:7.3f} {r['submit_s']:8.3f} {r['map_reduce_s']:7.2f} "
                  f"{r['particles_per_s']:6.0f} {1e3 * r['core_s_per_particle']:11.3f} "
                  f"{r['mstep_client_s']:7.2f} "
                  f"{100 * r['task_stream']['compute_fraction']:6.1f} "
                  f"{tr['sums_transfers_to_workers']:6d} {tr['sums_bytes_to_workers'] / 1e6:7.1f} "
                  f"{tr['image_chunk_bytes'] / 1e6:8.1f} "
                  f"{r['memory']['max_worker_peak_MiB']:8.0f} "
                  f"{r['memory']['max_worker_growth_MiB']:8.0f}")
        r0 = rec[0]
        print(f"  per-chain sums (2 halves, padded box {2 * r0['box']}): "
              f"{r0['reduction']['sums_bytes_per_chain'] / 1e6:.1f} MB")
    refs = res["refine"] + ([res["workers"]["refine_1"]] if res["workers"].get("refine_1")
                            else [])
    if refs:
        print("\nRefinement iterations vs N")
        print(f"{'N':>6s} {'box':>4s} {'W':>2s} {'it':>2s} {'kind':>6s} {'level':>5s} "
              f"{'evals/p':>8s} {'time s':>7s} {'p/s':>6s} {'core ms/p':>9s} "
              f"{'core µs/eval':>12s}")
        for r in refs:
            for it in r["iterations"]:
                print(f"{r['n']:6d} {r['box']:4d} {r['workers']:2d} {it['iteration']:2d} "
                      f"{'local' if it['local'] else 'global':>6s} {it['level']:5d} "
                      f"{it['mean_pose_evaluations']:8.0f} {it['time_s']:7.1f} "
                      f"{it['particles_per_s']:6.0f} {1e3 * it['core_s_per_particle']:9.1f} "
                      f"{it['core_us_per_evaluation']:12.3f}")
        print(f"{'N':>6s} {'W':>2s} {'wall s':>7s} {'non-E s':>7s} {'tasks':>6s} {'busy %':>6s} "
              f"{'sums→w':>6s} {'sums MB':>7s} {'peak MiB':>8s} {'grow MiB':>8s}")
        for r in refs:
            print(f"{r['n']:6d} {r['workers']:2d} {r['wall_s']:7.1f} {r['non_estep_s']:7.1f} "
                  f"{r['task_stream']['n_tasks']:6d} "
                  f"{100 * r['task_stream']['compute_fraction']:6.1f} "
                  f"{r['reduction']['measured']['sums_transfers_to_workers']:6d} "
                  f"{r['reduction']['measured']['sums_bytes_to_workers'] / 1e6:7.1f} "
                  f"{r['memory']['max_worker_peak_MiB']:8.0f} "
                  f"{r['memory']['max_worker_growth_MiB']:8.0f}")
    w = res["workers"]
    if w.get("recon_1") and w.get("recon_2"):
        s = w["recon_1"]["map_reduce_s"] / w["recon_2"]["map_reduce_s"]
        print(f"\n1 → 2 workers, reconstruction N={w['recon_1']['n']}: speed-up {s:.2f}, "
              f"parallel efficiency {s / 2:.0%}")
        w["recon_speedup"], w["recon_efficiency"] = s, s / 2
    if w.get("refine_1") and w.get("refine_2"):
        for key, name in (("first_global", "global it 1"), ("last_local", "local last it")):
            s = w["refine_1"][key]["time_s"] / w["refine_2"][key]["time_s"]
            print(f"1 → 2 workers, refinement N={w['refine_1']['n']} {name}: speed-up {s:.2f}, "
                  f"parallel efficiency {s / 2:.0%}")
            w[f"refine_{key}_speedup"] = s
    if res["mstep"]:
        print("\nClient-side M-step from sums (2 halves → half maps, FSC, full map)")
        for r in res["mstep"]:
            print(f"  box {r['box']:4d}: sums {r['sums_bytes'] / 1e6:8.1f} MB, one add "
                  f"{r['add_s']:.3f} s, reconstruct {r['reconstruct_s']:.2f} s")


if __name__ == "__main__":
    main()
