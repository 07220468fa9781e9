"""Pose-search benchmark: is ``branch_and_bound`` a branch and bound? Against exhaustive search.

One question: on noisy particles, does the search return the optimum of the finest grid (what
``exhaustive_search`` returns), how often did its bound alone decide (no candidate dropped by a
cap), and with how much less work?

Setup (defaults): box 64 from ``../shared/data/7pbl_64_2.4.mrc``; ``--particles`` noisy particles
(SNR ``--snr``, CTF on, random shifts and scales) to search, and ``--recon-particles`` (2,000)
other particles of the same simulation reconstructed at their true poses: the reference
(FSC-Wiener full map) and the noise model (per-shell σ² of those particles' residuals against
it). Search: levels 2 → 4 of the Hopf grid, 49 shifts (±3 px at 1 px), ``r_align`` 12 Fourier
pixels, particle radius 0.4·D, true scales, shift prior 0, the jobs' caps
(``--first-level-candidates``, default 2,048; 256 after). Exhaustive: every level-4 cell ×
every reachable shift.

Reported: ``recall`` (fraction of particles whose error equals the exhaustive optimum within
1e-6 relative); ``certified_fraction``: the particles whose search no cap cut
(``SearchResult.pruning``) — the search's bound holds at cell centres with a heuristic grid
margin (docs/design-notes.md), so this is the most a certificate could claim, not a proof;
``work_ratio`` (exhaustive Fourier-pixel·pose operations ÷ the search's: every candidate of a
level counted by the pixels of that level's band, every true error by the alignment band's) and
``evaluation_ratio`` (the same in pose counts); per level, the mean candidates pruned by the
bound and dropped by the cap.

    python benchmarks/pose_search.py --particles 10            # quick
    python benchmarks/pose_search.py --json benchmarks/results/pose_search.json

``--json PATH`` writes the six summary keys; the rest goes to ``PATH`` with the suffix
``.details.json``.
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


def timed_searches(reference_rfft, data, params):
    """``(search result, s, exhaustive result, s)``: the jobs' search and the exhaustive one on
    the same particles, each timed (one process)."""
    from dask_refine.core.pose_search import branch_and_bound, exhaustive_search

    t0 = time.perf_counter()
    bnb = branch_and_bound(reference_rfft, data, params)
    t_bnb = time.perf_counter() - t0
    t0 = time.perf_counter()
    exh = exhaustive_search(reference_rfft, data, params)
    return bnb, t_bnb, exh, time.perf_counter() - t0


def run(args) -> dict:
    from dask_refine.core.pose_search import (SearchParams, branch_and_bound,
                                              exhaustive_search)


def search_work(result, params, box: int) -> np.ndarray:
    """Fourier-pixel·pose operations per particle of a search result: each level's candidates ×
    its band's pixels, plus one alignment-band error per level (the best-bound candidate's) and
    the last level's survivors' true errors where that level's band is not the whole band."""
    from dask_refine.core.pose_search import band_pixels, level_band

    from dask_refine.core.pose_search import search_levels

    levels = search_levels(params)
    m_true = band_pixels(box, 0.0, params.r_align)[0].size
    work = np.zeros(result.pruning.shape[0])
    for j, lvl in enumerate(levels):
        band = level_band(params, box, lvl)
        cand, by_bound, by_cap = (result.pruning[:, j, i] for i in range(3))
        work += cand * band_pixels(box, 0.0, band)[0].size + m_true
        if lvl == levels[-1] and band < params.r_align:
            work += np.maximum(1, cand - by_bound - by_cap) * m_true
    return work


def run(args) -> dict:
    from dask_refine.core.pose_search import SearchParams, band_pixels, search_levels
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
    bnb, t_bnb, exh, t_exh = timed_searches(ref, data, params)
    same = bnb.error <= exh.error * (1 + 1e-6)
    uncapped = bnb.pruning[:, :, 2].sum(axis=1) == 0
    ours = search_work(bnb, params, box)
    exh_work = float(exh.n_evaluations[0]) * band_pixels(box, 0.0, params.r_align)[0].size
    steps = [{"level": lvl,
              "candidates": float(bnb.pruning[:, j, 0].mean()),
              "pruned_bound": float(bnb.pruning[:, j, 1].mean()),
              "pruned_cap": float(bnb.pruning[:, j, 2].mean())}
             for j, lvl in enumerate(search_levels(params))]
    return {
        "snr": args.snr, "particles": args.particles,
        "recall": float(same.mean()),
        "certified_fraction": float(uncapped.mean()),
        "work_ratio": float(exh_work / ours.mean()),
        "evaluation_ratio": float(exh.n_evaluations[0] / bnb.n_evaluations.mean()),
        "exhaustive_evaluations": int(exh.n_evaluations[0]),
        "exhaustive_pixel_evaluations": exh_work,
        "bnb_mean_evaluations": float(bnb.n_evaluations.mean()),
        "bnb_mean_pixel_evaluations": float(ours.mean()),
        "median_angular_error_deg": {
            "bnb": float(np.median(angular_distance_deg(bnb.rotation, truth["rotation"]))),
            "exhaustive": float(np.median(angular_distance_deg(exh.rotation,
                                                               truth["rotation"])))},
        "missed": np.flatnonzero(~same).tolist(),
        "steps": steps,
        "seconds": {"prepare": t_prep, "bnb": t_bnb, "exhaustive": t_exh},
        "params": dict(params.__dict__),
        "map": str(args.map), "box": box, "recon_particles": args.recon_particles,
    }


def print_table(r: dict) -> None:
    p = r["params"]
    print(f"SNR {r['snr']:g}, {r['particles']} particles, box {r['box']}, levels 2→4, 49 shifts, "
          f"r_align {p['r_align']:g}, caps {p['first_level_candidates']} then "
          f"{p['max_candidates']}")
    print("| search | evaluations / particle | Fourier-pixel ops / particle | same optimum "
          "| no cap fired | median ang. err | s / particle |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    n = r["particles"]
    print(f"| exhaustive | {r['exhaustive_evaluations']:,} | "
          f"{r['exhaustive_pixel_evaluations']:,.0f} | — | — | "
          f"{r['median_angular_error_deg']['exhaustive']:.2f}° | "
          f"{r['seconds']['exhaustive'] / n:.2f} |")
    print(f"| branch and bound | {r['bnb_mean_evaluations']:,.0f} | "
          f"{r['bnb_mean_pixel_evaluations']:,.0f} | {r['recall']:.2f} | "
          f"{r['certified_fraction']:.2f} | {r['median_angular_error_deg']['bnb']:.2f}° | "
          f"{r['seconds']['bnb'] / n:.2f} |")
    print(f"work_ratio {r['work_ratio']:.1f}, evaluation_ratio {r['evaluation_ratio']:.1f}")
    print("| level | candidates | pruned by bound | dropped by cap |")
    print("|---:|---:|---:|---:|")
    for s in r["steps"]:
        print(f"| {s['level']} | {s['candidates']:,.0f} | {s['pruned_bound']:,.0f} | "
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
