"""Pose-search benchmark: is the search a branch and bound? Against exhaustive search.

One question: on noisy particles, does the search return the optimum of the finest grid (what
``exhaustive_search`` returns), does it *know* that it did (no candidate dropped except by its
bound), and with how much less work? Asked of two searches: the certified branch and bound
(``core.certified_search``, the reported one) and the capped beam search the refinement jobs
run (``core.pose_search.branch_and_bound``, for comparison).

Setup (defaults): box 64 from ``../shared/data/7pbl_64_2.4.mrc``; ``--particles`` noisy particles
(SNR ``--snr``, CTF on, random shifts and scales) to search, and ``--recon-particles`` (2,000)
other particles of the same simulation reconstructed at their true poses: the reference
(FSC-Wiener full map) and the noise model (per-shell σ² of those particles' residuals against
it). Search: levels 2 → 4 of the Hopf grid, 49 shifts (±3 px at 1 px), ``r_align`` 12 Fourier
pixels, particle radius 0.4·D, true scales, shift prior 0; the beam's caps
(``--first-level-candidates``, default 2,048; 256 after); the certified search's failure
probability ``--epsilon`` (10⁻³ per evaluation). Exhaustive: every level-4 cell × every
reachable shift.

Reported: ``recall`` (fraction of particles whose error equals the exhaustive optimum within
1e-6 relative); ``certified_fraction``: particles whose search no safety valve cut (every
candidate was evaluated or pruned by its bound); ``work_ratio``: exhaustive Fourier-pixel·pose
operations ÷ the search's mean (the certified search counts every pixel × candidate it
touches, its per-particle table products, the beam search that gives its first incumbent and
its share of the reference-side tables; the beam: ``pose_search.search_pixel_work``);
``evaluation_ratio`` the same in candidates; per step, the mean candidates pruned by the bound
and dropped by the cap.

    python benchmarks/pose_search.py --particles 10            # quick
    python benchmarks/pose_search.py --json benchmarks/results/pose_search.json

``--json PATH`` writes the six summary keys (the certified search's); the rest goes to
``PATH`` with the suffix ``.details.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def prepare(map_path, snr, n_search, n_recon, seed, work: Path):
    """Simulate, reconstruct the reference from ``n_recon`` particles at their true poses, and
    estimate the noise model. Returns ``(reference_rfft, data, truth, info)``."""
    from dask_refine.core.backprojection import (FourierSums, backproject_particles,
                                                 particle_ctfs)
    from dask_refine.core.fourier import centred_rfftn
    from dask_refine.core.noise import noise_weights, shell_power_sums, sigma2_from_sums
    from dask_refine.core.pose_search import ParticleData
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH
    from dask_refine.jobs.reconstruct import reconstruct_halves_and_full

    volume, px = read_map(map_path)
    box = volume.shape[0]
    n = n_search + n_recon
    path = work / f"sim_snr{snr:g}_n{n}_s{seed}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    store = simulate_store(volume, px, path,
                           SimulationConfig(n_particles=n, snr=snr, seed=seed, chunk_size=500))
    meta = store.metadata(["half_set", *CTF_COLUMNS])
    for k in ("rotation", "shift_A", "scale"):
        meta[k] = store.read_column(k, group=GROUND_TRUTH)
    images = np.asarray(store.images[:])
    rec = np.arange(n_search, n)
    sub = {k: v[rec] for k, v in meta.items()}
    sums = backproject_particles(FourierSums.zeros(2, box), images[rec], sub, sub["half_set"], px)
    _, curve, full = reconstruct_halves_and_full(sums, box, px)
    ref = prepare_reference_rfft(np.asarray(full, np.float32))
    # noise model: residuals of the reconstruction particles at their true poses
    total_s = total_c = 0.0
    for start in range(0, rec.size, 250):
        rows = rec[start:start + 250]
        m = {k: v[rows] for k, v in meta.items()}
        model = extract_central_slices_rfft(ref, m["rotation"], box) * (
            m["scale"].reshape(-1, 1, 1) * particle_ctfs(m, box, px))
        from dask_refine.core.fourier import translate_rfft
        x = translate_rfft(centred_rfftn(images[rows], 2), m["shift_A"] / px)
        s, c = shell_power_sums(x - model)
        total_s, total_c = total_s + s, total_c + c
    w = noise_weights(sigma2_from_sums(total_s, total_c), box)
    srch = np.arange(n_search)
    ms = {k: v[srch] for k, v in meta.items()}
    data = ParticleData(centred_rfftn(images[srch], 2), particle_ctfs(ms, box, px),
                        ms["scale"], w)
    truth = {"rotation": ms["rotation"], "origin_px": ms["shift_A"] / px}
    return ref, data, truth, {"box": box, "pixel_size_A": px, "fsc": np.asarray(curve).tolist()}


def timed_searches(reference_rfft, data, params, epsilon: float = 1e-3,
                   which=("beam", "certified", "exhaustive")):
    """``{name: (result, seconds)}`` for the beam search the jobs run, the certified branch and
    bound and the exhaustive search on the same particles (one process), those in ``which``."""
    from dask_refine.core.certified_search import BoundSettings, certified_search
    from dask_refine.core.pose_search import branch_and_bound, exhaustive_search

    out = {}
    for name, fn in (("beam", lambda: branch_and_bound(reference_rfft, data, params)),
                     ("certified", lambda: certified_search(reference_rfft, data, params,
                                                            BoundSettings(epsilon=epsilon))),
                     ("exhaustive", lambda: exhaustive_search(reference_rfft, data, params))):
        if name not in which:
            continue
        t0 = time.perf_counter()
        out[name] = (fn(), time.perf_counter() - t0)
    return out


def summarise(result, work, exh, exh_work: float, truth) -> dict:
    """Recall, certified fraction, work and evaluation ratios and errors of one search."""
    from dask_refine.core.rotations import angular_distance_deg

    same = result.error <= exh.error * (1 + 1e-6)
    certified = (result.certified if result.certified is not None
                 else result.pruning[:, :, 2].sum(axis=1) == 0)
    return {"recall": float(same.mean()), "certified_fraction": float(np.mean(certified)),
            "work_ratio": float(exh_work / work.mean()),
            "worst_work_ratio": float(exh_work / work.max()),
            "evaluation_ratio": float(exh.n_evaluations[0] / result.n_evaluations.mean()),
            "mean_evaluations": float(result.n_evaluations.mean()),
            "mean_pixel_evaluations": float(work.mean()),
            "median_angular_error_deg": float(np.median(angular_distance_deg(
                result.rotation, truth["rotation"]))),
            "missed": np.flatnonzero(~same).tolist(),
            "steps": [{"candidates": float(result.pruning[:, j, 0].mean()),
                       "pruned_bound": float(result.pruning[:, j, 1].mean()),
                       "pruned_cap": float(result.pruning[:, j, 2].mean())}
                      for j in range(result.pruning.shape[1])]}


def run(args) -> dict:
    from dask_refine.core.certified_search import BoundSettings, search_steps
    from dask_refine.core.pose_search import (SearchParams, band_pixels, search_levels,
                                              search_pixel_work)
    from dask_refine.core.rotations import angular_distance_deg

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ref, data, truth, info = prepare(args.map, args.snr, args.particles, args.recon_particles,
                                     args.seed, work)
    t_prep = time.perf_counter() - t0
    box = info["box"]
    params = SearchParams(r_align=args.r_align, particle_radius_px=0.4 * box, first_level=2,
                          last_level=4, max_shift_px=args.max_shift, shift_step_px=1.0,
                          first_level_candidates=args.first_level_candidates)
    runs = timed_searches(ref, data, params, args.epsilon)
    exh = runs["exhaustive"][0]
    exh_work = float(exh.n_evaluations[0]) * band_pixels(box, 0.0, params.r_align)[0].size
    beam = summarise(runs["beam"][0], search_pixel_work(runs["beam"][0], params, box), exh,
                     exh_work, truth)
    for j, lvl in enumerate(search_levels(params)):
        beam["steps"][j]["step"] = f"level {lvl}"
    cert_result = runs["certified"][0]
    cert = summarise(cert_result, cert_result.pixel_work, exh, exh_work, truth)
    steps, cascade = search_steps(params, BoundSettings(epsilon=args.epsilon), box)
    names = [f"level {lvl}, band {b:.2f}" for lvl, bands in steps.items() for b in bands]
    names += [f"level {params.last_level}, band {b:.2f}" for b in cascade]
    for row, name in zip(cert["steps"], names):
        row["step"] = name
    return {
        "snr": args.snr, "particles": args.particles,
        **{k: cert[k] for k in ("recall", "certified_fraction", "work_ratio",
                                "evaluation_ratio")},
        "epsilon": args.epsilon,
        "certified": cert, "beam": beam,
        "exhaustive_evaluations": int(exh.n_evaluations[0]),
        "exhaustive_pixel_evaluations": exh_work,
        "exhaustive_median_angular_error_deg": float(np.median(angular_distance_deg(
            exh.rotation, truth["rotation"]))),
        "seconds": {"prepare": t_prep, **{k: v[1] for k, v in runs.items()}},
        "params": dict(params.__dict__),
        "map": str(args.map), "box": box, "recon_particles": args.recon_particles,
    }


def print_table(r: dict) -> None:
    p = r["params"]
    n = r["particles"]
    print(f"SNR {r['snr']:g}, {n} particles, box {r['box']}, levels 2→4, 49 shifts, "
          f"r_align {p['r_align']:g}; beam caps {p['first_level_candidates']} then "
          f"{p['max_candidates']}; certified: ε = {r['epsilon']:g} per evaluation")
    print("| search | evaluations / particle | Fourier-pixel ops / particle | same optimum "
          "| certified | work ratio (worst) | median ang. err | s / particle |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| exhaustive | {r['exhaustive_evaluations']:,} | "
          f"{r['exhaustive_pixel_evaluations']:,.0f} | — | — | 1 | "
          f"{r['exhaustive_median_angular_error_deg']:.2f}° | "
          f"{r['seconds']['exhaustive'] / n:.2f} |")
    for name, label in (("certified", "certified branch and bound"),
                        ("beam", "capped beam (the jobs')")):
        s = r[name]
        print(f"| {label} | {s['mean_evaluations']:,.0f} | {s['mean_pixel_evaluations']:,.0f} | "
              f"{s['recall']:.2f} | {s['certified_fraction']:.2f} | {s['work_ratio']:.1f} "
              f"({s['worst_work_ratio']:.1f}) | {s['median_angular_error_deg']:.2f}° | "
              f"{r['seconds'][name] / n:.2f} |")
    for name in ("certified", "beam"):
        print(f"\n{name}: mean candidates per step")
        print("| step | candidates | pruned by bound | dropped by cap |")
        print("|---|---:|---:|---:|")
        for s in r[name]["steps"]:
            print(f"| {s['step']} | {s['candidates']:,.0f} | {s['pruned_bound']:,.0f} | "
                  f"{s['pruned_cap']:,.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map", default=str(HERE.parent.parent / "shared" / "data"
                                        / "7pbl_64_2.4.mrc"))
    p.add_argument("--particles", type=int, default=50)
    p.add_argument("--snr", type=float, default=0.05)
    p.add_argument("--recon-particles", type=int, default=2000)
    p.add_argument("--r-align", type=float, default=12.0)
    p.add_argument("--max-shift", type=float, default=3.0)
    p.add_argument("--first-level-candidates", type=int, default=2048)
    p.add_argument("--epsilon", type=float, default=1e-3,
                   help="the certified search's failure probability per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(HERE / "results" / "pose_search"))
    p.add_argument("--json", default=None, help="write the summary to this path")
    args = p.parse_args()
    r = run(args)
    print_table(r)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        keep = ("snr", "particles", "recall", "certified_fraction", "work_ratio",
                "evaluation_ratio")
        Path(args.json).write_text(json.dumps({k: r[k] for k in keep}, indent=1))
        Path(args.json).with_suffix(".details.json").write_text(
            json.dumps(r, indent=1, default=float))


if __name__ == "__main__":
    main()
