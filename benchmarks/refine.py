"""Homogeneous Refinement benchmark: dask_refine (branch and bound) vs RELION 3.1 auto-refine,
and branch and bound vs exhaustive search on the same grid.

Simulates a dataset from a map in ../shared/data (or the shipped one) with known truth, refines
it from the truth low-passed to 30 Å, and prints a table (and writes JSON to
benchmarks/results/refine_<case>.json): gold-standard resolution, FSC-to-truth resolution (0.5),
median angular error, iterations, wall time, particles/s per iteration. RELION gets the same
particles through a RELION 3.1 STAR file (normalised images, noise std 1) and the same initial map.

    python benchmarks/refine.py                       # box 64, 2,000 particles, SNR 0.1
    python benchmarks/refine.py --map ../shared/data/1tii_128_1.0.mrc --n 5000 --snr 0.05
    python benchmarks/refine.py --skip-relion         # ours only
    python benchmarks/refine.py --low-snr --map ../shared/data/7pbl_64_2.4.mrc --skip-relion
    python benchmarks/refine.py --realistic --skip-relion --skip-exhaustive
    python benchmarks/refine.py --low-snr --alignment-folds 1   # align against the half maps

``--low-snr`` is the issue's low-SNR case (3,000 particles, SNR 0.05, CTF, origins ±4 Å) and
adds the figures its targets are stated in: the FSC-to-truth of the known-pose reconstruction
of the same particles, and the *oracle* median pose error (``benchmarks/oracle.py``: each
particle's continuous error minimum against the other half's true-pose reference), beside the
refined median pose error and the fraction of particles flipped (> 20° off) that the oracle
gets right. ``--compare-hard`` also runs ``marginalize=False`` (best pose only).

``--realistic`` is the realistic case (4,000 particles, SNR 0.05, CTF, origins ±4 Å, and the
simulator's real-data nuisances, :data:`REALISTIC`: 10% junk, 30% of the views within ~10° of
the top view, ice-coloured noise, an undeclared B = 100 Å² envelope). Pose errors are over the
non-junk particles only, and the known-pose map is the reconstruction of the non-junk particles
from their true poses. ``--n`` overrides either preset's particle count (a quick end-to-end
check: ``--realistic --n 300 --max-iterations 1``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from peers import relion_label, relion_program

HERE = Path(__file__).resolve().parent
#: The realistic case's nuisances (``SimulationConfig`` fields, docs/design-notes.md).
REALISTIC = {"junk_fraction": 0.1, "preferred_view_fraction": 0.3,
             "preferred_view_spread_deg": 10.0, "noise_color": "ice",
             "envelope_bfactor_A2": 100.0}


def fsc_truth(path, truth, px, threshold=0.5):
    from dask_refine.core.fsc import fsc, resolution_at_threshold
    from dask_refine.io.mrc import read_map

    volume, _ = read_map(path)
    return resolution_at_threshold(fsc(volume, truth), truth.shape[0], px, threshold)


def run_ours(store_path, initial, out, n_workers, max_iterations, **options):
    from distributed import Client, LocalCluster

    from dask_refine.jobs.refine import RefineConfig, run_refine

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("dask_refine.core._numba_kernels"))  # JIT cache warm
        t0 = time.perf_counter()
        # one map (Homogeneous) or a list of maps, one per class (Heterogeneous Refinement)
        maps = (tuple(str(m) for m in initial) if isinstance(initial, (list, tuple))
                else str(initial))
        summary = run_refine(RefineConfig(store=str(store_path), initial_map=maps,
                                          out_dir=str(out), max_iterations=max_iterations,
                                          **options),
                             client=client, log=print)
        summary["wall_s"] = time.perf_counter() - t0
    return summary


def run_relion(star, initial, out, px, box, mask_diameter_A, threads, timeout_s=None,
               relion_bin=None):
    """RELION auto-refine (MPI with 3 ranks when available: 1 leader + 2 followers); RELION
    from ``relion_bin`` or ``PATH`` (:func:`peers.relion_program`).

    With ``timeout_s`` the run is stopped after that long and its last finished iteration is
    reported (``converged: False``), the way the issue's scale note reports RELION on 2 cores.
    """
    import os
    import signal

    out.mkdir(parents=True, exist_ok=True)
    args = ["--i", Path(star).name, "--o", str(out.resolve() / "run"),
            "--ref", str(Path(initial).resolve()), "--ini_high", "30",
            "--auto_refine", "--split_random_halves", "--ctf", "--particle_diameter",
            f"{mask_diameter_A:.1f}", "--flatten_solvent", "--zero_mask", "--oversampling", "1",
            "--healpix_order", "2", "--auto_local_healpix_order", "4", "--offset_range", "5",
            "--offset_step", "2", "--sym", "C1", "--low_resol_join_halves", "40", "--norm",
            "--scale", "--pad", "2", "--firstiter_cc", "--dont_combine_weights_via_disc",
            "--pool", "30", "--j", str(threads)]
    mpi_program = relion_program("relion_refine_mpi", relion_bin)
    mpi = shutil.which("mpirun") and mpi_program
    cmd = (["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", mpi_program]
           if mpi else [relion_program("relion_refine", relion_bin)]) + args
    t0 = time.perf_counter()
    # RELION resolves rlnImageName relative to its working folder (the project folder)
    with open(out / "stdout.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                cwd=Path(star).parent, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode, timed_out = 0, True
    wall = time.perf_counter() - t0
    if returncode != 0:
        return {"error": (out / "stdout.txt").read_text()[-2000:], "wall_s": wall}
    models = sorted(out.glob("run_it*_half1_model.star"))
    result = {"wall_s": wall, "converged": not timed_out, "iterations": len(models) - 1,
              "command": " ".join(cmd)}  # run_it000 is the initial model
    # each iteration's seconds: between its model file and the one before (its files' times)
    stamps = [m.stat().st_mtime for m in models]
    result["iteration_s"] = [b - a for a, b in zip(stamps, stamps[1:])]
    final = out / "run_class001.mrc"
    if final.exists():
        result["map"] = str(final)
        result["data_star"] = str(out / "run_data.star")
    elif models:  # stopped: the average of the last iteration's half maps
        last = models[-1].name.replace("_half1_model.star", "")
        halves = [out / f"{last}_half{h}_class001.mrc" for h in (1, 2)]
        if all(h.exists() for h in halves):
            from dask_refine.io.mrc import read_map, write_map

            avg = 0.5 * (read_map(halves[0])[0] + read_map(halves[1])[0])
            write_map(out / f"{last}_average.mrc", avg, px)
            result["map"] = str(out / f"{last}_average.mrc")
            result["data_star"] = str(out / f"{last}_data.star")
    if models:
        import starfile

        general = starfile.read(models[-1], always_dict=True).get("model_general")
        if general is not None and "rlnCurrentResolution" in general:
            result["resolution_A"] = float(np.asarray(general["rlnCurrentResolution"]).ravel()[0])
    return result


def bnb_vs_exhaustive(store, out_dir, summary, px, n_sub=30, level=4, particles=None):
    """On a subset (of ``particles``, ``(N,)`` bool, default all), at the final reference: B&B
    and exhaustive search on the same level-``level`` grid; angular error to the truth and
    evaluations."""
    from dask_refine.core.backprojection import particle_ctfs
    from dask_refine.core.fourier import centred_rfftn
    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import ParticleData, SearchParams
    from dask_refine.core.projection import prepare_reference_rfft
    from dask_refine.core.rotations import angular_distance_deg
    from dask_refine.io.mrc import read_map
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH

    it = Path(out_dir) / "iterations" / f"iter_{summary['iterations']:03d}"
    state = json.loads((it / "state.json").read_text())
    poses = np.load(it / "poses.npz")
    half = store.read_column("half_set")
    rows = np.flatnonzero((half == 0) & (True if particles is None else particles))[:n_sub]
    ref = prepare_reference_rfft(read_map(it / "reference_A.mrc")[0])
    box = store.info.box_size
    meta = {k: store.read_column(k)[rows] for k in CTF_COLUMNS}
    data = ParticleData(centred_rfftn(store.images.get_orthogonal_selection(
        (rows, slice(None), slice(None))), 2), particle_ctfs(meta, box, px),
        poses["scale"][rows], noise_weights(poses["sigma2"], box))
    radius = 0.4 * box
    params = SearchParams(r_align=min(state["r_align"], box / 2 - 1), particle_radius_px=radius,
                          first_level=2, last_level=level, max_shift_px=0.05 * box,
                          shift_step_px=1.0)
    truth = store.read_column("rotation", group=GROUND_TRUTH)[rows]
    from pose_search import timed_searches

    runs = timed_searches(ref, data, params, which=("beam", "exhaustive"))
    (bnb, t_bnb), (exh, t_exh) = runs["beam"], runs["exhaustive"]
    return {
        "level": level, "n_particles": int(rows.size),
        "bnb_median_angular_error_deg": float(np.median(angular_distance_deg(bnb.rotation, truth))),
        "exhaustive_median_angular_error_deg": float(np.median(angular_distance_deg(exh.rotation,
                                                                                     truth))),
        "bnb_mean_evaluations": float(bnb.n_evaluations.mean()),
        "exhaustive_evaluations": int(exh.n_evaluations[0]),
        "evaluation_ratio": float(exh.n_evaluations[0] / bnb.n_evaluations.mean()),
        "same_optimum_fraction": float(np.mean(bnb.error <= exh.error * (1 + 1e-6))),
        "bnb_s_per_particle": t_bnb / rows.size, "exhaustive_s_per_particle": t_exh / rows.size,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map", default=str(HERE.parent / "dask_refine" / "data" / "1tii_64_2.0.mrc"))
    p.add_argument("--n", type=int, default=None,
                   help="particles (default: 2,000; 3,000 with --low-snr, 4,000 with --realistic)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-iterations", type=int, default=15)
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--skip-ours", action="store_true",
                   help="run the peer only, on the same (deterministic) particles, and merge its "
                   "row into this case's earlier JSON, keeping the rows found there (ours, the "
                   "known-pose map, the oracle)")
    p.add_argument("--skip-exhaustive", action="store_true")
    p.add_argument("--relion-timeout-min", type=float, default=None,
                   help="stop RELION after this many minutes and report its last iteration")
    p.add_argument("--relion-bin", default=None, metavar="DIR",
                   help="RELION's binaries from DIR (e.g. benchmarks/.peers/relion5/bin, built by "
                   "install_peers.sh --relion5-source) instead of PATH (Debian's RELION 3.1)")
    p.add_argument("--work", default=str(HERE / "results" / "refine"))
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--low-snr", action="store_true",
                        help="3,000 particles, SNR 0.05, origins ±4 Å, with oracle and known poses")
    preset.add_argument("--realistic", action="store_true",
                        help="4,000 particles, SNR 0.05, origins ±4 Å, 10%% junk, 30%% preferred "
                        "top views (10°), ice noise, undeclared B = 100 Å², with known poses; "
                        "pose errors over the non-junk particles")
    p.add_argument("--shift-sigma-A", type=float, default=3.0)
    p.add_argument("--oracle-sample", type=int, default=300)
    p.add_argument("--compare-hard", action="store_true",
                   help="also refine with marginalize=False")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alignment-folds", type=int, default=None, metavar="F",
                   help="the job's alignment_folds (default: the job's default)")
    args = p.parse_args()
    n_default, nuisances = 2000, {}
    if args.low_snr or args.realistic:
        args.snr, args.shift_sigma_A = 0.05, 2.0  # 95% of origins within ±4 Å
        n_default = 3000 if args.low_snr else 4000
        nuisances = REALISTIC if args.realistic else {}
    args.n = args.n or n_default

    from dask_refine.core.rotations import angular_distance_deg
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.star import export_star
    from dask_refine.io.store import GROUND_TRUTH

    truth, px = read_map(args.map)
    box = truth.shape[0]
    work = Path(args.work) / (f"{Path(args.map).stem}_box{box}_n{args.n}_snr{args.snr:g}"
                              + ("_realistic" if args.realistic else ""))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    simulation = SimulationConfig(n_particles=args.n, snr=args.snr, chunk_size=250,
                                  shift_sigma_A=args.shift_sigma_A, seed=args.seed, **nuisances)
    t0 = time.perf_counter()
    store = simulate_store(truth, px, work / "particles.zarr", simulation)
    simulate_s = time.perf_counter() - t0
    initial = work / "initial.mrc"
    write_map(initial, truth, px)  # both programs low-pass it to 30 Å themselves
    result_path = HERE / "results" / f"refine_{work.name}.json"
    rows = (json.loads(result_path.read_text())["rows"]
            if args.skip_ours and result_path.exists() else {})
    gt = store.read_column("rotation", group=GROUND_TRUTH)
    # pose errors are scored over the true particles (all of them unless there is junk)
    keep = ~store.read_column("is_junk", group=GROUND_TRUTH)
    oracle = None
    if (args.low_snr or args.realistic) and "known_poses" not in rows:
        from oracle import true_pose_references

        from dask_refine.core.fsc import resolution_at_threshold

        _, curve, known, _ = true_pose_references(store, px, particles=keep)
        write_map(work / "known_pose_map.mrc", known, px)
        rows["known_poses"] = {
            "gold_standard_A": resolution_at_threshold(curve, box, px, 0.143),
            "fsc_truth_05_A": fsc_truth(work / "known_pose_map.mrc", truth, px),
            "n_particles": int(keep.sum())}
    if (args.low_snr or args.realistic) and not (args.skip_ours and "oracle" in rows):
        from oracle import oracle_pose_errors

        oracle = oracle_pose_errors(store, px, args.oracle_sample, particles=keep)
        rows["oracle"] = {"median_angular_error_deg": float(np.median(oracle["error_deg"])),
                          "p90_angular_error_deg": float(np.percentile(oracle["error_deg"], 90)),
                          "n_sample": int(oracle["rows"].size), "r_align": oracle["r_align"]}
    import csv

    chosen = ({} if args.alignment_folds is None
              else {"alignment_folds": args.alignment_folds})
    variants = [("dask_refine", chosen)] + ([("dask_refine_hard",
                                              {**chosen, "marginalize": False})]
                                            if args.compare_hard else [])
    for name, options in ([] if args.skip_ours else variants):
        folder = work / ("ours" if name == "dask_refine" else "ours_hard")
        ours = run_ours(work / "particles.zarr", initial, folder, args.workers,
                        args.max_iterations, **options)
        it = folder / "iterations" / f"iter_{ours['iterations']:03d}"
        poses = np.load(it / "poses.npz")
        err = angular_distance_deg(poses["rotation"], gt)
        per_it = list(csv.DictReader(open(folder / "iterations.csv")))
        rows[name] = {
            "gold_standard_A": ours["resolution_A"],
            "fsc_truth_05_A": fsc_truth(folder / "map.mrc", truth, px),
            "median_angular_error_deg": float(np.median(err[keep])),
            "p90_angular_error_deg": float(np.percentile(err[keep], 90)),
            "flipped_fraction": float(np.mean(err[keep] > 20)),
            "n_particles_scored": int(keep.sum()),
            "iterations": ours["iterations"], "wall_s": ours["wall_s"],
            "converged": ours["converged"],
            "particles_per_s_per_iteration": float(np.mean([float(r["particles_per_s"])
                                                             for r in per_it])),
            "mean_pose_evaluations_per_particle": float(np.mean(
                [float(r["mean_pose_evaluations"]) for r in per_it])),
            "iterations_log": per_it,
        }
        if oracle is not None:
            sample = oracle["rows"]
            rows[name]["median_angular_error_sample_deg"] = float(np.median(err[sample]))
            rows[name]["flipped_oracle_right_fraction"] = float(np.mean(
                (err[sample] > 20) & (oracle["error_deg"] <= 20)))
            rows[name]["median_error_vs_oracle"] = (rows[name]["median_angular_error_deg"]
                                                    / rows["oracle"]["median_angular_error_deg"])
            rows[name]["fsc_truth_vs_known_poses"] = (rows[name]["fsc_truth_05_A"]
                                                      / rows["known_poses"]["fsc_truth_05_A"])
    if not (args.skip_exhaustive or args.skip_ours):
        rows["bnb_vs_exhaustive"] = bnb_vs_exhaustive(store, work / "ours", ours, px,
                                                      particles=keep)
    if not args.skip_relion:
        if relion_program("relion_refine", args.relion_bin) is None:
            print("relion_refine not found: run benchmarks/install_peers.sh; skipping RELION")
        else:
            star = work / "relion_in" / "particles.star"
            export_star(store, star)  # no poses: the simulated store holds none at top level
            # 3 MPI ranks (1 leader + 2 followers) × 1 thread: 2 compute threads on 2 cores
            timeout = None if args.relion_timeout_min is None else 60 * args.relion_timeout_min
            rel = run_relion(star, initial, work / "relion", px, box, 0.8 * box * px, 1, timeout,
                             relion_bin=args.relion_bin)
            rel["program"] = relion_label(args.relion_bin)
            if rel.get("map"):
                from dask_refine.core.rotations import euler_to_matrix
                import starfile

                data = starfile.read(rel["data_star"], always_dict=True)
                part = data["particles"]
                rot = euler_to_matrix(part["rlnAngleRot"], part["rlnAngleTilt"],
                                      part["rlnAnglePsi"])
                rel["fsc_truth_05_A"] = fsc_truth(rel["map"], truth, px)
                rel_err = angular_distance_deg(rot, gt)[keep]
                rel["median_angular_error_deg"] = float(np.median(rel_err))
                rel["p90_angular_error_deg"] = float(np.percentile(rel_err, 90))
                rel["flipped_fraction"] = float(np.mean(rel_err > 20))
                if rel.get("iteration_s"):
                    rel["particles_per_s_per_iteration"] = float(np.mean(
                        [args.n / t for t in rel["iteration_s"]]))
            # one row per RELION (3.1 from PATH, 5 from --relion-bin)
            rows["relion_autorefine" + ("_" + rel["program"].split()[-1].replace(".", "_")
                                        if args.relion_bin else "")] = rel

    case = "realistic, " if args.realistic else ""
    print(f"\nHomogeneous Refinement, {case}box {box}, {args.n} particles, SNR {args.snr:g}, "
          f"{args.workers} cores")
    if args.realistic:
        print(f"{int((~keep).sum())} junk particles; pose errors and the known-pose map over the "
              f"{int(keep.sum())} others")
    print(f"{'method':24s} {'gold-std Å':>10s} {'truth@0.5 Å':>11s} {'ang err °':>9s} "
          f"{'p90 °':>7s} {'>20° %':>6s} {'iters':>5s} {'wall s':>8s} {'converged':>9s}")
    for key in ("known_poses", "oracle", "dask_refine", "dask_refine_hard",
                *sorted(k for k in rows if k.startswith("relion_autorefine"))):
        r = rows.get(key)
        name = f"{r['program']} auto-refine" if r and "program" in r else key
        if not r or "error" in r:
            if r:
                print(f"{name:24s} failed: {r['error'][-200:]}")
            continue
        gs = r.get("gold_standard_A", r.get("resolution_A"))
        print(f"{name:24s} {gs or float('nan'):10.2f} {r.get('fsc_truth_05_A', float('nan')):11.2f}"
              f" {r.get('median_angular_error_deg', float('nan')):9.2f}"
              f" {r.get('p90_angular_error_deg', float('nan')):7.2f}"
              f" {100 * r.get('flipped_fraction', float('nan')):6.1f} "
              f"{r.get('iterations', 0):5d} {r.get('wall_s', float('nan')):8.0f} "
              f"{'yes' if r.get('converged', True) else 'no':>9s}")
    for key, r in rows.items():
        if isinstance(r, dict) and r.get("particles_per_s_per_iteration"):
            name = f"{r['program']} auto-refine" if "program" in r else key
            print(f"{name}: {r['particles_per_s_per_iteration']:.1f} particles/s per iteration "
                  f"(mean over its {r['iterations']} iterations), {r['wall_s']:.0f} s in all")
    for name in ("dask_refine", "dask_refine_hard"):
        r = rows.get(name, {})
        if "median_error_vs_oracle" in r:
            print(f"{name}: median pose error {r['median_error_vs_oracle']:.2f}× the oracle's, "
                  f"FSC-to-truth {r['fsc_truth_vs_known_poses']:.2f}× the known-pose map's, "
                  f"{100 * r['flipped_fraction']:.1f}% flipped (> 20°), "
                  f"{100 * r['flipped_oracle_right_fraction']:.1f}% of the oracle sample "
                  "flipped where the oracle is right")
    if "bnb_vs_exhaustive" in rows:
        e = rows["bnb_vs_exhaustive"]
        print(f"\nB&B vs exhaustive (level {e['level']}, {e['n_particles']} particles, final "
              f"reference): {e['evaluation_ratio']:.0f}× fewer evaluations, same optimum for "
              f"{100 * e['same_optimum_fraction']:.0f}%, median angular error "
              f"{e['bnb_median_angular_error_deg']:.2f}° vs "
              f"{e['exhaustive_median_angular_error_deg']:.2f}°")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    from dataclasses import asdict

    result_path.write_text(json.dumps(
        {"box": box, "n": args.n, "snr": args.snr, "realistic": args.realistic,
         "simulation": asdict(simulation), "simulate_s": simulate_s,
         "n_junk": int((~keep).sum()), "rows": rows}, indent=2, default=float))


if __name__ == "__main__":
    main()
