"""Reconstruction benchmark: dask_refine vs RELION's relion_reconstruct and cryoDRGN's
backproject_voxel, on the same simulated particles and poses (CTF on).

Prints a table (and writes benchmarks/results/reconstruct.json): images/s and FSC-to-truth
resolution (0.5) for each program, and the real-space correlation of our map with RELION's from
the same STAR file, which checks that Euler angles, origins and CTF follow RELION's conventions.
Peers: run benchmarks/install_peers.sh first (they are never dependencies of dask_refine).

    python benchmarks/reconstruct.py                 # box 64 (2,000) and box 128 (1,000)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
CRYODRGN = HERE / ".peers" / "cryodrgn-venv" / "bin" / "cryodrgn"


def correlation(a, b, mask=None):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if mask is not None:
        m = mask.ravel() > 0.5
        a, b = a[m], b[m]
    return float(np.corrcoef(a, b)[0, 1])


def ours(store, work, client):
    """The Reconstruction Only job, and an in-process unregularised map for the RELION check."""
    from dask_refine.core.backprojection import FourierSums, backproject_particles
    from dask_refine.core.reconstruction import reconstruct
    from dask_refine.jobs.reconstruct import (ReconstructConfig, load_pose_metadata,
                                              run_reconstruct)

    t0 = time.perf_counter()
    summary = run_reconstruct(ReconstructConfig(store=str(store.path), out_dir=str(work / "ours")),
                              client=client, log=lambda m: None)
    wall = time.perf_counter() - t0
    meta = load_pose_metadata(store, True)
    box = store.info.box_size
    sums = backproject_particles(FourierSums.zeros(1, box), store.images[:], meta,
                                 np.zeros(store.info.n_particles, int), store.info.pixel_size_A)
    plain = reconstruct(sums.data[0], sums.weight[0], box)
    return summary, wall, plain


def relion(star, px, work):
    exe = shutil.which("relion_reconstruct")
    if exe is None:
        return None
    out = work / "relion.mrc"
    cmd = [exe, "--i", star.name, "--o", str(out.resolve()), "--ctf", "--angpix", f"{px}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=star.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    return {"wall_s": wall, "map": out, "command": " ".join(cmd)}


def cryodrgn(star, stack, box, px, work):
    if not CRYODRGN.exists():
        return None
    poses, ctf, out = work / "poses.pkl", work / "ctf.pkl", work / "cryodrgn"
    t0 = time.perf_counter()
    for cmd in ([str(CRYODRGN), "parse_pose_star", str(star), "-o", str(poses), "-D", str(box),
                 "--Apix", f"{px}"],
                [str(CRYODRGN), "parse_ctf_star", str(star), "-o", str(ctf), "-D", str(box),
                 "--Apix", f"{px}"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=star.parent)
        if proc.returncode != 0:
            return {"error": " ".join(cmd) + "\n" + proc.stderr[-1500:]}
    t_parse = time.perf_counter() - t0
    cmd = [str(CRYODRGN), "backproject_voxel", str(stack), "--poses", str(poses), "--ctf",
           str(ctf), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=star.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-1500:]}
    maps = sorted(out.glob("*.mrc")) if out.is_dir() else [out]
    full = [m for m in maps if "half" not in m.name]
    return {"wall_s": wall, "parse_s": t_parse, "map": full[0] if full else maps[0],
            "command": " ".join(cmd)}


def run_case(map_path, n, snr, client, results):
    from dask_refine.core.fsc import fsc, resolution_at_threshold
    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.star import export_star

    truth, px = read_map(map_path)
    box = truth.shape[0]
    work = HERE / "results" / "reconstruct" / f"box{box}_n{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = simulate_store(truth, px, work / "particles.zarr",
                           SimulationConfig(n_particles=n, snr=snr, chunk_size=500),
                           write_poses=True)
    star = work / "star" / "particles.star"
    export_star(store, star)
    mask = soft_sphere_mask(box, 0.4 * box, 3)

    def res(volume):
        return resolution_at_threshold(fsc(volume, truth), box, px, 0.5)

    summary, wall, plain = ours(store, work, client)
    ours_map = read_map(work / "ours" / "map.mrc")[0]
    rows = {"dask_refine": {"wall_s": wall, "backprojection_s": summary["backprojection_time_s"],
                            "images_per_s": n / wall,
                            "images_per_s_backprojection": n / summary["backprojection_time_s"],
                            "fsc_truth_05_A": res(ours_map),
                            "fsc_truth_05_unregularised_A": res(plain),
                            "gold_standard_A": summary["resolution_A"]}}
    rel = relion(star, px, work)
    if rel and "error" not in rel:
        rmap = read_map(rel["map"])[0]
        rel.update(images_per_s=n / rel["wall_s"], fsc_truth_05_A=res(rmap),
                   corr_with_ours_unregularised=correlation(plain, rmap),
                   corr_with_ours_unregularised_masked=correlation(plain, rmap, mask),
                   corr_with_ours_map=correlation(ours_map, rmap))
        rel["map"] = str(rel["map"])
    rows["relion_reconstruct"] = rel or {"error": "not installed"}
    cd = cryodrgn(star, star.with_suffix(".mrcs"), box, px, work)
    if cd and "error" not in cd:
        cmap = read_map(cd["map"])[0]
        flipped = cmap[::-1]
        c, cf = correlation(plain, cmap), correlation(plain, flipped)
        use = flipped if cf > c else cmap
        cd.update(images_per_s=n / cd["wall_s"], fsc_truth_05_A=res(use),
                  corr_with_ours_unregularised=max(c, cf), flipped_z_to_match=bool(cf > c))
        cd["map"] = str(cd["map"])
    rows["cryodrgn_backproject_voxel"] = cd or {"error": "not installed"}
    results[f"box{box}_n{n}"] = {"box": box, "n": n, "snr": snr, "pixel_size_A": px,
                                 "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["1tii_64_2.0.mrc:2000", "1tii_128_1.0.mrc:1000"],
                   help="MAP:N pairs (maps from ../shared/data)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    from distributed import Client, LocalCluster

    results = {}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("dask_refine.core._numba_kernels"))
        for case in args.cases:
            name, n = case.split(":")
            path = DATA / name if (DATA / name).exists() else Path(name)
            run_case(path, int(n), args.snr, client, results)
    print(f"\nReconstruction from known poses, SNR {args.snr:g}, CTF on, {args.workers} cores")
    print(f"{'case':14s} {'method':28s} {'wall s':>7s} {'images/s':>9s} {'truth@0.5 Å':>11s} "
          f"{'corr RELION':>11s}")
    for case, r in results.items():
        for name, row in r["rows"].items():
            if "error" in row:
                print(f"{case:14s} {name:28s} failed: {row['error'][-160:]!r}")
                continue
            corr = row.get("corr_with_ours_unregularised", float("nan"))
            print(f"{case:14s} {name:28s} {row['wall_s']:7.2f} {row['images_per_s']:9.0f} "
                  f"{row['fsc_truth_05_A']:11.2f} {corr:11.4f}")
        d = r["rows"]["dask_refine"]
        print(f"{case:14s} {'dask_refine (backprojection)':28s} {d['backprojection_s']:7.2f} "
              f"{d['images_per_s_backprojection']:9.0f}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reconstruct.json").write_text(json.dumps(results, indent=2,
                                                                  default=float))


if __name__ == "__main__":
    main()
