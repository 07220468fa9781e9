"""Heterogeneous and Non-Uniform Refinement benchmarks (issue 4).

* ``--case hetero``: a two-class mixture simulated from the 1TII map and the same map with a
  domain removed (x > centre + 3 px). dask_refine ``hetero-refine`` (K = 2, hard) side by side
  with RELION 3.1 Class3D (K = 2, same particles via STAR, same two initial maps, each program
  low-passing them to 30 Å). Prints classification accuracy (best matching of labels), per-class
  FSC-to-truth resolution, iterations and wall time.
* ``--case nu``: half the particles carry a domain shifted by 2 px (flexible). dask_refine
  Homogeneous vs Non-Uniform Refinement: FSC to the consensus (the average of the two states) of
  ``map.mrc`` and of ``map_nu.mrc``.

    python benchmarks/hetero.py --case hetero --n 1000 --relion-timeout-min 15
    python benchmarks/hetero.py --case nu --n 1000

Results: a table on stdout and ``benchmarks/results/hetero_<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from refine import fsc_truth, run_ours  # noqa: E402  (the homogeneous benchmark's helpers)

MAP = HERE.parent / "dask_refine" / "data" / "1tii_64_2.0.mrc"


def mixture(work: Path, n: int, snr: float, second):
    """Store of ``n`` particles: first half from the map, second half from ``second(map)``."""
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.io.simulate import SimulationConfig, resimulate_rows, simulate_store

    a, px = read_map(MAP)
    b = second(a)
    store = simulate_store(a, px, work / "particles.zarr",
                           SimulationConfig(n_particles=n, snr=snr, chunk_size=250, seed=7))
    resimulate_rows(work / "particles.zarr", b, slice(n // 2, n), seed=8)
    write_map(work / "map_a.mrc", a, px)
    write_map(work / "map_b.mrc", b, px)
    labels = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    return store, a, b, px, labels


def accuracy(assigned, labels) -> float:
    """Fraction right under the better of the two label matchings."""
    same = float(np.mean(assigned == labels))
    return max(same, 1.0 - same)


def relion_class3d(star: Path, refs, out: Path, px: float, box: int, timeout_s: float):
    """RELION 3.1 Class3D, K = len(refs), 3 MPI ranks × 1 thread; stopped after ``timeout_s``."""
    import os
    import signal

    import starfile
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    refs_star = out / "references.star"
    starfile.write({"": pd.DataFrame({"rlnReferenceImage": [str(Path(r).resolve())
                                                           for r in refs]})}, refs_star)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", "relion_refine_mpi",
           "--i", star.name, "--o", str(out.resolve() / "run"), "--ref", str(refs_star),
           "--ini_high", "30", "--ctf", "--particle_diameter", f"{0.8 * box * px:.1f}",
           "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--healpix_order", "2",
           "--offset_range", "5", "--offset_step", "2", "--sym", "C1", "--norm", "--scale",
           "--iter", "25", "--tau2_fudge", "4", "--pad", "2", "--pool", "30", "--j", "1",
           "--firstiter_cc", "--dont_combine_weights_via_disc"]
    t0 = time.perf_counter()
    with open(out / "stdout.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=star.parent,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            finished = proc.returncode == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            finished = False
    wall = time.perf_counter() - t0
    data = sorted(out.glob("run_it*_data.star"))
    if not data:
        return {"error": (out / "stdout.txt").read_text()[-1500:], "wall_s": wall}
    last = data[-1]
    it = last.name.split("_")[1]
    parts = starfile.read(last, always_dict=True)["particles"]
    return {"wall_s": wall, "finished": finished, "iterations": int(it[2:]),
            "class_number": parts["rlnClassNumber"].to_numpy() - 1,
            "maps": [str(out / f"run_{it}_class{k:03d}.mrc") for k in (1, 2)],
            "command": " ".join(cmd)}


def case_hetero(args, work: Path) -> dict:
    import starfile

    from dask_refine.io.star import export_star
    from dask_refine.jobs.refine import RefineConfig, run_refine

    def remove_domain(m):
        out = m.copy()
        out[:, :, m.shape[0] // 2 + 3:] = 0.0
        return out

    store, a, b, px, labels = mixture(work, args.n, args.snr, remove_domain)
    box = a.shape[0]
    rows = {}
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        summary = run_refine(RefineConfig(
            store=str(work / "particles.zarr"), out_dir=str(work / "ours"),
            initial_map=(str(work / "map_a.mrc"), str(work / "map_b.mrc")),
            max_iterations=args.max_iterations), client=client, log=print)
        wall = time.perf_counter() - t0
    assigned = starfile.read(work / "ours" / "particles.star",
                             always_dict=True)["particles"]["rlnClassNumber"].to_numpy() - 1
    rows["dask_refine hetero-refine"] = {
        "accuracy": accuracy(assigned, labels), "iterations": summary["iterations"],
        "wall_s": wall, "class_fsc_truth_05_A": [
            fsc_truth(work / "ours" / f"class_{k:03d}" / "map.mrc", t, px)
            for k, t in ((1, a), (2, b))]}
    if not args.skip_relion and shutil.which("relion_refine_mpi"):
        star = work / "relion_in" / "particles.star"
        export_star(store, star)
        rel = relion_class3d(star, [work / "map_a.mrc", work / "map_b.mrc"], work / "relion",
                             px, box, 60 * args.relion_timeout_min)
        if "class_number" in rel:
            cls = rel.pop("class_number")
            rel["accuracy"] = accuracy(cls, labels)
            # RELION's class order is its own: score each truth against its better map
            fscs = [[fsc_truth(m, t, px) for m in rel["maps"]] for t in (a, b)]
            rel["class_fsc_truth_05_A"] = [min(f) for f in fscs]
        rows["RELION 3.1 Class3D"] = rel
    print(f"\nHeterogeneous: 2 classes, box {box}, {args.n} particles, SNR {args.snr:g}, "
          f"{args.workers} cores")
    print(f"{'method':28s} {'accuracy':>8s} {'class 1 Å':>9s} {'class 2 Å':>9s} {'iters':>5s} "
          f"{'wall s':>7s}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:28s} failed: {r['error'][-200:]}")
            continue
        c1, c2 = r["class_fsc_truth_05_A"]
        print(f"{name:28s} {r['accuracy']:8.3f} {c1:9.2f} {c2:9.2f} {r['iterations']:5d} "
              f"{r['wall_s']:7.0f}" + ("" if r.get("finished", True) else "  (stopped)"))
    return rows


def case_nu(args, work: Path) -> dict:
    from dask_refine.io.mrc import read_map

    def move_domain(m):
        out = m.copy()
        c = m.shape[0] // 2
        out[:, :, c + 2:] = np.roll(m, 2, axis=1)[:, :, c + 2:]
        return out

    _, a, b, px, _ = mixture(work, args.n, args.snr, move_domain)
    consensus = (a + b) / 2
    from dask_refine.core.fsc import fsc

    rows = {}
    for name, nu in (("homogeneous", False), ("non-uniform", True)):
        summary = run_ours(work / "particles.zarr", work / "map_a.mrc", work / name,
                           args.workers, args.max_iterations,
                           **({"non_uniform": True} if nu else {}))
        final = work / name / ("map_nu.mrc" if nu else "map.mrc")
        volume = read_map(final)[0]
        rows[name] = {"fsc_consensus_05_A": fsc_truth(final, consensus, px),
                      "mean_fsc_consensus_shells_4_to_28": float(fsc(volume, consensus)[4:28]
                                                                 .mean()),
                      "gold_standard_A": summary["resolution_A"], "wall_s": summary["wall_s"],
                      "iterations": summary["iterations"]}
    print(f"\nNon-uniform: flexible domain in half the particles, box {a.shape[0]}, {args.n} "
          f"particles, SNR {args.snr:g}")
    print(f"{'method':14s} {'gold-std Å':>10s} {'consensus@0.5 Å':>15s} {'mean FSC':>8s} "
          f"{'wall s':>7s}")
    for name, r in rows.items():
        print(f"{name:14s} {r['gold_standard_A']:10.2f} {r['fsc_consensus_05_A']:15.2f} "
              f"{r['mean_fsc_consensus_shells_4_to_28']:8.3f} {r['wall_s']:7.0f}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("hetero", "nu"), required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-iterations", type=int, default=10)
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--relion-timeout-min", type=float, default=15.0)
    p.add_argument("--work", default=str(HERE / "results" / "hetero"))
    args = p.parse_args()
    work = Path(args.work) / f"{args.case}_n{args.n}_snr{args.snr:g}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = case_hetero(args, work) if args.case == "hetero" else case_nu(args, work)
    out = HERE / "results" / f"hetero_{args.case}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
