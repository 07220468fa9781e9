"""Local refinement benchmark (issue 18): a refinement started from poses perturbed by 5°.

Simulates particles of a map (box 64, CTF, SNR 0.1 by default, origins σ 2 Å), files their true
poses each turned by ``--perturb-deg`` about a random axis (and origins moved by a Gaussian
``--perturb-shift-A``), and runs ``refine --local-refinement`` from them, the initial map the
truth low-passed to ``--initial-lowpass-A``. Prints a table (and writes
``benchmarks/results/local_refine_<case>.json``): median and 90th-percentile pose error of the
filed and the refined poses, the largest angle of a final pose from its prior's centre in units
of the prior's σ (the issue asks for every final pose within 4σ), FSC-to-truth 0.5 of the
refined map and of the known-pose map of the same particles.

    python benchmarks/local_refine.py                     # 1,000 particles, SNR 0.1, 5°
    python benchmarks/local_refine.py --n 300 --max-iterations 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from refine import fsc_truth, run_ours

HERE = Path(__file__).resolve().parent


def turned(rotations, degrees: float, rng) -> np.ndarray:
    """Each rotation turned by ``degrees`` about a random axis."""
    from scipy.spatial.transform import Rotation

    axis = rng.normal(size=(len(rotations), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return np.matmul(Rotation.from_rotvec(np.deg2rad(degrees) * axis).as_matrix(), rotations)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map", default=str(HERE.parent.parent / "shared" / "data"
                                        / "7pbl_64_2.4.mrc"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--perturb-deg", type=float, default=5.0)
    p.add_argument("--perturb-shift-A", type=float, default=1.0)
    p.add_argument("--prior-sigma-deg", type=float, default=5.0)
    p.add_argument("--initial-lowpass-A", type=float, default=15.0)
    p.add_argument("--max-iterations", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(HERE / "results" / "local_refine"))
    args = p.parse_args()

    from dask_refine.core.rotations import angular_distance_deg
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.store import GROUND_TRUTH

    truth, px = read_map(args.map)
    box = truth.shape[0]
    name = f"{Path(args.map).stem}_n{args.n}_snr{args.snr:g}_perturb{args.perturb_deg:g}"
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = simulate_store(truth, px, work / "particles.zarr", SimulationConfig(
        n_particles=args.n, snr=args.snr, chunk_size=250, shift_sigma_A=2.0, seed=args.seed),
        write_poses=True)
    rng = np.random.default_rng([args.seed, 11])
    true_rot = store.read_column("rotation", group=GROUND_TRUTH)
    filed = turned(true_rot, args.perturb_deg, rng)
    store.write_column("rotation", filed)
    store.write_column("shift_A", store.read_column("shift_A", group=GROUND_TRUTH)
                       + rng.normal(0.0, args.perturb_shift_A, (args.n, 2)))
    write_map(work / "initial.mrc", truth, px)

    from oracle import true_pose_references

    _, _, known, _ = true_pose_references(store, px)
    write_map(work / "known_pose_map.mrc", known, px)
    rows = {"known poses": {"fsc_truth_05_A": fsc_truth(work / "known_pose_map.mrc", truth, px)},
            "filed (start)": {
                "median_angular_error_deg": float(np.median(angular_distance_deg(filed,
                                                                                 true_rot))),
                "p90_angular_error_deg": float(np.percentile(angular_distance_deg(filed,
                                                                                  true_rot), 90))}}
    summary = run_ours(work / "particles.zarr", work / "initial.mrc", work / "local",
                       args.workers, args.max_iterations, local_refinement=True,
                       prior_sigma_deg=args.prior_sigma_deg,
                       initial_lowpass_A=args.initial_lowpass_A)
    final = np.load(work / "local" / "iterations" / f"iter_{summary['iterations']:03d}"
                    / "poses.npz")["rotation"]
    error = angular_distance_deg(final, true_rot)
    from_prior = angular_distance_deg(final, filed) / args.prior_sigma_deg
    rows["refine --local-refinement"] = {
        "gold_standard_A": summary["resolution_A"],
        "fsc_truth_05_A": fsc_truth(work / "local" / "map.mrc", truth, px),
        "median_angular_error_deg": float(np.median(error)),
        "p90_angular_error_deg": float(np.percentile(error, 90)),
        "largest_distance_from_prior_sigmas": float(from_prior.max()),
        "iterations": summary["iterations"], "wall_s": summary["wall_s"]}
    out = HERE / "results" / f"local_refine_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"map": args.map, "n": args.n, "snr": args.snr,
                               "perturb_deg": args.perturb_deg, "rows": rows}, indent=1))
    print(f"\n{args.n} particles, SNR {args.snr:g}, poses filed {args.perturb_deg:g}° off, "
          f"prior σ {args.prior_sigma_deg:g}°\n")
    print("| run | gold-std | FSC-to-truth 0.5 | median pose err | 90th pct | farthest from "
          "its prior (σ) | iterations | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def cell(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "—"

    for label, row in rows.items():
        print(f"| {label} | {cell(row, 'gold_standard_A', '{:.2f} Å')} "
              f"| {cell(row, 'fsc_truth_05_A', '{:.2f} Å')} "
              f"| {cell(row, 'median_angular_error_deg', '{:.2f}°')} "
              f"| {cell(row, 'p90_angular_error_deg', '{:.2f}°')} "
              f"| {cell(row, 'largest_distance_from_prior_sigmas', '{:.2f}')} "
              f"| {cell(row, 'iterations', '{}')} | {cell(row, 'wall_s', '{:.0f} s')} |")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
