"""Outputs at an object-store URL: what staging and publishing cost next to a local folder.

Starts a moto S3 server on loopback (the same real S3 HTTP API the tests use; loopback, so the
figures are the client-side cost of the protocol, not a cloud network's bandwidth) and measures:

1. Reconstruction Only and a short Homogeneous Refinement, each run once into a local folder and
   once into ``s3://bench/…`` on the same warm cluster: wall time, time inside
   ``OutputFolder.publish`` (the uploads), files and bytes uploaded.
2. One refinement iteration folder of a box-128 and a box-256 job (the five maps and the poses
   a real iteration writes, same sizes): upload with ``publish_iteration`` and download with
   ``fetch_checkpoint`` (what ``--resume`` reads).

    python benchmarks/output_urls.py             # prints a table, writes results/output_urls.json
    python benchmarks/output_urls.py --quick     # smaller

Needs the test extra (s3fs, moto[server]).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BUCKET = "bench"


def start_server() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    return server, endpoint


class PublishTimer:
    """Wraps ``OutputFolder.publish`` (instrumentation only): seconds, files, bytes."""

    def __init__(self):
        from dask_refine.io.output_folder import OutputFolder

        self.cls, self.original = OutputFolder, OutputFolder.publish
        self.seconds, self.files, self.bytes = 0.0, 0, 0

    def __enter__(self):
        timer = self

        def publish(folder, rel="", last=None, exclude=()):
            before = _tree_bytes(folder.local / rel, exclude) if folder.is_remote else 0
            t0 = time.perf_counter()
            n = timer.original(folder, rel, last, exclude)
            timer.seconds += time.perf_counter() - t0
            timer.files += n
            timer.bytes += before
            return n

        self.cls.publish = publish
        return self

    def __exit__(self, *exc):
        self.cls.publish = self.original


def _tree_bytes(path: Path, exclude=()) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(path).parts)
               and p.relative_to(path).parts[0] not in exclude)


def job_rows(work: Path, quick: bool) -> list[dict]:
    from dask_refine.data import demo_map_path
    from dask_refine.core.fourier import fourier_downsample
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct
    from dask_refine.jobs.refine import RefineConfig, run_refine
    from dask_refine.parallel.cluster import ClusterConfig, dask_client

    volume, px = read_map(demo_map_path())
    rec_store = simulate_store(volume, px, work / "rec.zarr", SimulationConfig(
        n_particles=500 if quick else 2000, snr=0.1, chunk_size=250, seed=1), write_poses=True)
    small = fourier_downsample(volume, 32)
    write_map(work / "initial.mrc", small, 2 * px)
    ref_store = simulate_store(small, 2 * px, work / "ref.zarr", SimulationConfig(
        n_particles=64 if quick else 200, snr=1.0, chunk_size=32, seed=2))
    rows = []
    with dask_client(ClusterConfig(n_workers=2, dashboard_address=None)) as client:
        jobs = {
            "reconstruct box 64": lambda out: run_reconstruct(ReconstructConfig(
                store=str(rec_store.path), out_dir=out), client=client, log=lambda m: None),
            "refine box 32, 3 iterations": lambda out: run_refine(RefineConfig(
                store=str(ref_store.path), initial_map=str(work / "initial.mrc"), out_dir=out,
                max_iterations=3, max_level=4), client=client, log=lambda m: None),
        }
        for name, run in jobs.items():
            run(str(work / "warm" / name.split()[0]))  # warm the workers (imports, caches)
            for where in ("local", "s3"):
                out = (f"s3://{BUCKET}/{name.split()[0]}" if where == "s3"
                       else str(work / "local" / name.split()[0]))
                with PublishTimer() as timer:
                    t0 = time.perf_counter()
                    run(out)
                    wall = time.perf_counter() - t0
                rows.append({"job": name, "out": where, "wall_s": wall,
                             "publish_s": timer.seconds, "files": timer.files,
                             "MB": timer.bytes / 1e6})
    return rows


def iteration_rows(work: Path, boxes) -> list[dict]:
    from dask_refine.io.mrc import write_map
    from dask_refine.io.output_folder import OutputFolder
    from dask_refine.jobs.checkpoint import (IterationWriter, fetch_checkpoint,
                                             publish_iteration)

    rows = []
    rng = np.random.default_rng(0)
    for box in boxes:
        url = f"s3://{BUCKET}/iteration-{box}"
        n = 10_000
        with OutputFolder(url) as out:
            with IterationWriter(out.local, 1) as folder:
                vol = rng.standard_normal((box, box, box), dtype=np.float32)
                for name in ("reference_A", "reference_B", "half_A", "half_B", "map"):
                    write_map(folder / f"{name}.mrc", vol, 1.0)
                np.savez(folder / "poses.npz", rotation=np.zeros((n, 3, 3)),
                         origin_px=np.zeros((n, 2)), scale=np.ones(n), sigma2=np.ones(box))
                (folder / "state.json").write_text(json.dumps({"iteration": 1}))
            size = _tree_bytes(out.local / "iterations")
            t0 = time.perf_counter()
            publish_iteration(out, 1)
            up = time.perf_counter() - t0
        with OutputFolder(url) as out:
            t0 = time.perf_counter()
            fetch_checkpoint(out, resume=True)
            down = time.perf_counter() - t0
        rows.append({"box": box, "MB": size / 1e6, "upload_s": up, "upload_MB_s": size / 1e6 / up,
                     "resume_fetch_s": down, "fetch_MB_s": size / 1e6 / down})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    server, _ = start_server()
    work = Path(tempfile.mkdtemp(prefix="bench-urls-"))
    try:
        jobs = job_rows(work, args.quick)
        iterations = iteration_rows(work, (128,) if args.quick else (128, 256))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()
    print(f"{'job':30s} {'out':>5s} {'wall s':>8s} {'publish s':>10s} {'files':>6s} {'MB':>7s}")
    for r in jobs:
        print(f"{r['job']:30s} {r['out']:>5s} {r['wall_s']:8.2f} {r['publish_s']:10.2f} "
              f"{r['files']:6d} {r['MB']:7.1f}")
    print(f"\n{'iteration box':>13s} {'MB':>7s} {'upload s':>9s} {'MB/s':>6s} "
          f"{'resume fetch s':>15s} {'MB/s':>6s}")
    for r in iterations:
        print(f"{r['box']:13d} {r['MB']:7.1f} {r['upload_s']:9.2f} {r['upload_MB_s']:6.0f} "
              f"{r['resume_fetch_s']:15.2f} {r['fetch_MB_s']:6.0f}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "output_urls.json").write_text(json.dumps(
        {"jobs": jobs, "iterations": iterations, "quick": args.quick}, indent=2) + "\n")


if __name__ == "__main__":
    main()
