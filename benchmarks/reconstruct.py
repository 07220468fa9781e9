"""Reconstruction benchmark: dask_refine vs RELION's relion_reconstruct and cryoDRGN's
backproject_voxel, on the same simulated particles with known poses (CTF on).

For each case (box 64: 2,000 particles; box 128: 1,000; SNR 0.1) it simulates a particle store,
exports it as a RELION 3.1 STAR file + .mrcs stack, and runs
  * ours:     the Reconstruction Only job (``run_reconstruct``) on a warm LocalCluster
              (``--workers`` processes × 1 thread); images/s for the whole job and for its
              backprojection phase;
  * RELION:   ``relion_reconstruct --ctf`` (one process; RELION 3.1 has no thread option), and
              ``mpirun -np W relion_reconstruct_mpi`` when it exists and works;
  * cryoDRGN: ``cryodrgn backproject_voxel`` (its own venv, torch CPU) after
              ``parse_pose_star`` / ``parse_ctf_star`` (timed separately).
Accuracy: FSC-to-truth resolution at 0.5 of every map, and the real-space Pearson correlation of
our maps with RELION's maps of the same kind (whole box and inside a soft sphere of radius 0.4·D).
Diagnostics (``--no-diagnostics`` to skip): a noise-free run that isolates the conventions
(Euler angles, origins, CTF, scale) from the noise handling, and a breakdown of what separates our
unregularised map from RELION's (RELION's real-space corner mask, the Nyquist edge, Pipe–Menon
gridding, the full-map SSNR formula).

Peers: ``bash benchmarks/install_peers.sh`` first; a missing peer is reported and skipped.
Results: a table on stdout and ``benchmarks/results/reconstruct.json``.

    python benchmarks/reconstruct.py                       # both cases, ~ a few minutes, 2 cores
    python benchmarks/reconstruct.py --boxes 64 --n64 500  # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MAP_CANDIDATES = {
    64: [REPO / "dask_refine" / "data" / "1tii_64_2.0.mrc", REPO.parent / "shared" / "data" /
         "1tii_64_2.0.mrc"],
    128: [REPO.parent / "shared" / "data" / "1tii_128_1.0.mrc"],
}
CRYODRGN = HERE / ".peers" / "cryodrgn-venv" / "bin" / "cryodrgn"


# ----------------------------------------------------------------------------- helpers
def correlation(a, b, mask=None) -> float:
    """Real-space Pearson correlation (inside ``mask > 0.5`` when given)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if mask is not None:
        keep = np.asarray(mask) > 0.5
        a, b = a[keep], b[keep]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def lowpass_hard(volume, radius_px: float) -> np.ndarray:
    """Zero every Fourier component with |k| ≥ radius_px (full FFT, origin at D//2)."""
    box = volume.shape[0]
    c = np.arange(box) - box // 2
    kz, ky, kx = np.meshgrid(c, c, c, indexing="ij")
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(np.asarray(volume, np.float64))))
    f[np.sqrt(kz ** 2 + ky ** 2 + kx ** 2) >= radius_px] = 0
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f))).real


def flip_about_centre(volume, axes) -> np.ndarray:
    """Mirror along ``axes`` about index D//2 (i → (D − i) mod D), keeping the origin fixed."""
    out = volume
    for ax in axes:
        out = np.roll(np.flip(out, ax), 1, ax)
    return out


def relion_full_map_ssnr(fsc_curve) -> np.ndarray:
    """RELION 3.1 BackProjector::updateSSNRarrays with is_whole_instead_of_half: FSC of the halves
    → c = sqrt(2F/(F+1)) clipped to [.., 0.999] → SSNR = c/(1−c)."""
    f = np.maximum(0.001, np.asarray(fsc_curve, np.float64))
    c = np.minimum(0.999, np.sqrt(2.0 * f / (f + 1.0)))
    return c / (1.0 - c)


def run_timed(cmd, cwd, log_path, env=None):
    """Run ``cmd``; return (wall seconds, CompletedProcess). Output goes to ``log_path``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    # RELION's progress bar is one very long line; keep the log readable
    text = re.sub(r"[^\n]*~~\(,_,\">[^\n]*", "[progress bar]", proc.stdout + "\n" + proc.stderr)
    Path(log_path).write_text(" ".join(map(str, cmd)) + "\n" + text)
    return wall, proc


def tail(proc, n=600) -> str:
    text = re.sub(r"[^\n]*~~\(,_,\">[^\n]*", "", (proc.stderr or "") + (proc.stdout or ""))
    return text.strip()[-n:]


def find_map(box: int, data_dir: str | None) -> Path | None:
    names = {64: "1tii_64_2.0.mrc", 128: "1tii_128_1.0.mrc"}
    cands = ([Path(data_dir) / names[box]] if data_dir and box in names else []) + \
        MAP_CANDIDATES.get(box, [])
    return next((p for p in cands if p.is_file()), None)


# ----------------------------------------------------------------------------- peers
class Relion:
    def __init__(self, workers: int, use_mpi: bool):
        self.exe = shutil.which("relion_reconstruct")
        self.mpi_exe = shutil.which("relion_reconstruct_mpi") if use_mpi else None
        self.mpirun = shutil.which("mpirun") if use_mpi else None
        self.workers = workers
        self.mpi_ok: bool | None = None  # unknown until tried
        self.version = ""
        if self.exe:
            p = subprocess.run([self.exe, "--version"], capture_output=True, text=True)
            self.version = (p.stdout.strip().splitlines() or [""])[0]

    def cmd(self, star: Path, out: Path, px: float, extra=(), mpi=False):
        base = ["--i", star.name, "--o", str(out.resolve()), "--ctf", "--angpix", f"{px:g}",
                *extra]
        if not mpi:
            return [self.exe, *base]
        root = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        return [self.mpirun, *root, "-np", str(self.workers), self.mpi_exe, *base]

    def run(self, star: Path, out: Path, px: float, extra=(), mpi=False):
        wall, proc = run_timed(self.cmd(star, out, px, extra, mpi), star.parent,
                               out.with_suffix(".log"))
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"exit {proc.returncode}: {tail(proc)}",
                    "command": " ".join(self.cmd(star, out, px, extra, mpi))}
        return {"wall_s": wall, "map": str(out),
                "command": " ".join(self.cmd(star, out, px, extra, mpi))}


def cryodrgn_run(star: Path, stack: Path, box: int, px: float, work: Path) -> dict:
    if not CRYODRGN.exists():
        return {"error": f"cryoDRGN not installed ({CRYODRGN} missing; run "
                         "benchmarks/install_peers.sh)"}
    star, stack, work = star.resolve(), stack.resolve(), work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    poses, ctf, out = work / "poses.pkl", work / "ctf.pkl", work / "out"
    parse_s = 0.0
    for name, cmd in (
            ("parse_pose_star", [str(CRYODRGN), "parse_pose_star", str(star), "-o", str(poses),
                                 "-D", str(box), "--Apix", f"{px:g}"]),
            ("parse_ctf_star", [str(CRYODRGN), "parse_ctf_star", str(star), "-o", str(ctf),
                                "-D", str(box), "--Apix", f"{px:g}"])):
        wall, proc = run_timed(cmd, work, work / f"{name}.log")
        parse_s += wall
        if proc.returncode != 0:
            return {"error": f"{name} exit {proc.returncode}: {tail(proc)}"}
    cmd = [str(CRYODRGN), "backproject_voxel", str(stack), "--poses", str(poses), "--ctf",
           str(ctf), "-o", str(out)]
    wall, proc = run_timed(cmd, work, work / "backproject_voxel.log")
    if proc.returncode != 0 or not (out / "backproject.mrc").is_file():
        return {"error": f"backproject_voxel exit {proc.returncode}: {tail(proc)}"}
    m = re.search(r"Backprojected ([\d,]+) images in ([\d.]+)s", proc.stdout + proc.stderr)
    return {"wall_s": wall, "parse_s": parse_s,
            "self_reported_backprojection_s": float(m.group(2)) if m else None,
            "map": str(out / "backproject.mrc"),
            "half_maps": [str(out / "half_map_a.mrc"), str(out / "half_map_b.mrc")],
            "command": " ".join(cmd)}


# ----------------------------------------------------------------------------- ours
def run_ours(store, out_dir: Path, workers: int, client, repeat: int) -> dict:
    """Time the Reconstruction Only job on the warm ``client`` (best of ``repeat``)."""
    from dask_refine.jobs.reconstruct import ReconstructConfig, run_reconstruct
    from dask_refine.parallel.cluster import ClusterConfig

    config = ReconstructConfig(store=str(store.path), out_dir=str(out_dir),
                               cluster=ClusterConfig(n_workers=workers))
    walls, bps, summary = [], [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        summary = run_reconstruct(config, client=client, log=lambda *a, **k: None)
        walls.append(time.perf_counter() - t0)
        bps.append(summary["backprojection_time_s"])
    return {"config": config, "summary": summary, "wall_s": min(walls),
            "backprojection_s": min(bps), "all_wall_s": walls, "all_backprojection_s": bps}


def ours_extra_maps(store, config, client) -> dict:
    """Same sums as the job (recomputed, untimed) → unregularised full map, and the full map
    regularised with RELION's full-map SSNR formula (for the like-for-like RELION --fsc check)."""
    from dask_refine.core.fourier import rfft_radius
    from dask_refine.core.fsc import fsc, ssnr_from_fsc
    from dask_refine.core.reconstruction import reconstruct
    from dask_refine.jobs.reconstruct import compute_sums, load_pose_metadata

    meta = load_pose_metadata(store, True)
    groups = meta["half_set"].astype(np.int64)
    sums = compute_sums(store, meta, groups, 2, config, client)
    box = store.info.box_size
    halves = [reconstruct(sums.data[h], sums.weight[h], box) for h in range(2)]
    curve = fsc(halves[0], halves[1])
    data, weight = sums.data[0] + sums.data[1], sums.weight[0] + sums.weight[1]
    # RELION keeps only |k| < D/2 (r² < max_r² in BackProjector); ours keeps round(|k|) ≤ D/2
    padded = data.shape[0]
    inside = rfft_radius(padded, 3) < padded / 2
    return {
        "unregularised": reconstruct(data, weight, box),
        "unregularised_lt_nyquist": reconstruct(np.where(inside, data, 0), weight, box),
        "relion_ssnr": reconstruct(data, weight, box, ssnr=relion_full_map_ssnr(curve)),
        "ours_ssnr": reconstruct(data, weight, box, ssnr=ssnr_from_fsc(curve, full_map=True)),
        "half_fsc": curve,
    }


def write_fsc_star(curve, path: Path) -> Path:
    """Half-map FSC as RELION's ``--fsc`` input (rlnSpectralIndex, rlnGoldStandardFsc)."""
    import pandas as pd
    import starfile

    starfile.write({"fsc": pd.DataFrame({"rlnSpectralIndex": np.arange(len(curve)),
                                         "rlnGoldStandardFsc": np.asarray(curve, float)})},
                   path, overwrite=True)
    return path


# ----------------------------------------------------------------------------- one case
def run_case(box: int, n: int, args, client, relion: Relion) -> dict:
    from dask_refine.core.fsc import fsc, resolution_at_threshold
    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.star import export_star

    map_path = find_map(box, args.data_dir)
    if map_path is None:
        print(f"[box {box}] no ground-truth map found; skipped", flush=True)
        return {"error": "map not found"}
    truth, px = read_map(map_path)
    work = Path(args.work_dir) / f"box{box}_n{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"[box {box}] {n} particles, SNR {args.snr:g}, {px:g} Å/px, map {map_path}", flush=True)

    t0 = time.perf_counter()
    store = simulate_store(truth, px, work / "particles.zarr",
                           SimulationConfig(n_particles=n, snr=args.snr,
                                            chunk_size=args.chunk_size, seed=args.seed),
                           write_poses=True, source=str(map_path))
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    star = export_star(store, work / "star" / "particles.star")
    t_export = time.perf_counter() - t0
    stack = star.with_suffix(".mrcs")

    mask = soft_sphere_mask(box, 0.4 * box, 3.0)
    relion_mask = soft_sphere_mask(box, box / 2, 3.0)  # RELION's softMaskOutsideMap default

    def res(volume) -> float:
        return resolution_at_threshold(fsc(volume, truth), box, px, 0.5)

    def corrs(a, b) -> dict:
        return {"whole": correlation(a, b), "masked_0.4D": correlation(a, b, mask)}

    rows: dict[str, dict] = {}
    maps: dict[str, np.ndarray] = {}

    # --- ours
    print(f"[box {box}] dask_refine Reconstruction Only job …", flush=True)
    o = run_ours(store, work / "ours", args.workers, client, args.repeat)
    s = o["summary"]
    for key, fname in (("ours_map", "map.mrc"), ("ours_half_A", "half_A.mrc"),
                       ("ours_half_B", "half_B.mrc")):
        maps[key] = read_map(work / "ours" / fname)[0]
    extra = ours_extra_maps(store, o["config"], client)
    maps["ours_unregularised"] = extra["unregularised"]
    maps["ours_relion_ssnr"] = extra["relion_ssnr"]
    maps["ours_unregularised_lt_nyquist"] = extra["unregularised_lt_nyquist"]
    rows["dask_refine job (map.mrc)"] = {
        "wall_s": o["wall_s"], "images_per_s": n / o["wall_s"],
        "fsc_truth_05_A": res(maps["ours_map"]), "gold_standard_0143_A": s["resolution_A"],
        "all_wall_s": o["all_wall_s"], "map": str(work / "ours" / "map.mrc")}
    rows["dask_refine backprojection phase"] = {
        "wall_s": o["backprojection_s"], "images_per_s": n / o["backprojection_s"],
        "all_s": o["all_backprojection_s"]}
    for h in "AB":
        rows[f"dask_refine half {h}"] = {"fsc_truth_05_A": res(maps[f"ours_half_{h}"])}
    rows["dask_refine full, unregularised"] = {"fsc_truth_05_A": res(maps["ours_unregularised"])}

    # --- RELION
    if relion.exe is None:
        print(f"[box {box}] RELION not found (relion_reconstruct not on PATH; run "
              "benchmarks/install_peers.sh): skipped", flush=True)
        rows["RELION relion_reconstruct"] = {"error": "relion_reconstruct not installed"}
    else:
        print(f"[box {box}] {relion.version.strip()} …", flush=True)
        rdir = star.parent
        best = None
        for _ in range(max(1, args.repeat)):
            r = relion.run(star, rdir / "relion.mrc", px)
            if "error" in r:
                best = r
                break
            best = r if best is None or r["wall_s"] < best["wall_s"] else best
        rows["RELION relion_reconstruct (1 process)"] = best
        if "error" not in best:
            maps["relion"] = read_map(best["map"])[0]
            best.update(images_per_s=n / best["wall_s"], fsc_truth_05_A=res(maps["relion"]))
            rows["dask_refine full, unregularised"]["corr_relion"] = corrs(
                maps["ours_unregularised"], maps["relion"])
        else:
            print(f"[box {box}] relion_reconstruct failed: {best['error']}", flush=True)

        if relion.mpi_exe and relion.mpirun and relion.mpi_ok is not False:
            r = relion.run(star, rdir / "relion_mpi.mrc", px, mpi=True)
            relion.mpi_ok = "error" not in r
            name = f"RELION mpirun -np {args.workers} relion_reconstruct_mpi"
            rows[name] = r
            if relion.mpi_ok:
                m = read_map(r["map"])[0]
                r.update(images_per_s=n / r["wall_s"], fsc_truth_05_A=res(m))
                if "relion" in maps:
                    r["corr_relion_1process"] = correlation(m, maps["relion"])
            else:
                print(f"[box {box}] MPI RELION failed, single process only: {r['error']}",
                      flush=True)
        elif args.no_mpi:
            rows["RELION MPI"] = {"error": "skipped (--no-mpi)"}
        elif not (relion.mpi_exe and relion.mpirun):
            rows["RELION MPI"] = {"error": "relion_reconstruct_mpi or mpirun not found; "
                                           "RELION ran as a single process"}

        # halves, and the full map regularised with our half-map FSC (untimed)
        for h, sub in (("A", 1), ("B", 2)):
            r = relion.run(star, rdir / f"relion_half{sub}.mrc", px, ("--subset", str(sub)))
            if "error" not in r:
                maps[f"relion_half_{h}"] = read_map(r["map"])[0]
                rows[f"RELION half {sub} (--subset {sub})"] = {
                    "fsc_truth_05_A": res(maps[f"relion_half_{h}"])}
                rows[f"dask_refine half {h}"]["corr_relion"] = corrs(
                    maps[f"ours_half_{h}"], maps[f"relion_half_{h}"])
        fsc_star = write_fsc_star(extra["half_fsc"], rdir / "ours_half_fsc.star")
        r = relion.run(star, rdir / "relion_fsc.mrc", px, ("--fsc", fsc_star.name))
        if "error" not in r:
            maps["relion_fsc"] = read_map(r["map"])[0]
            rows["RELION --fsc (our half-map FSC)"] = {"fsc_truth_05_A": res(maps["relion_fsc"])}
            rows["dask_refine job (map.mrc)"]["corr_relion"] = corrs(maps["ours_map"],
                                                                     maps["relion_fsc"])
        if not args.no_diagnostics:
            r = relion.run(star, rdir / "relion_skip_gridding.mrc", px, ("--skip_gridding",))
            if "error" not in r:
                maps["relion_skip_gridding"] = read_map(r["map"])[0]

    # --- cryoDRGN
    if args.no_cryodrgn:
        rows["cryoDRGN backproject_voxel"] = {"error": "skipped (--no-cryodrgn)"}
    else:
        print(f"[box {box}] cryoDRGN backproject_voxel …", flush=True)
        c = cryodrgn_run(star, stack, box, px, work / "cryodrgn")
        rows["cryoDRGN backproject_voxel"] = c
        if "error" in c:
            print(f"[box {box}] cryoDRGN: {c['error']}", flush=True)
        else:
            cmap = read_map(c["map"])[0]
            ref_name = "relion" if "relion" in maps else "ours_unregularised"
            # find the orientation that matches: identity, mirrors about the centre, inversion
            cands = {}
            for axes in ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)):
                cands[axes] = correlation(flip_about_centre(cmap, axes), maps[ref_name])
            axes = max(cands, key=cands.get)
            maps["cryodrgn"] = flip_about_centre(cmap, axes)
            c.update(images_per_s=n / c["wall_s"], fsc_truth_05_A=res(maps["cryodrgn"]),
                     orientation_search={"reference": ref_name,
                                         "corr_by_flip_axes": {str(k): v for k, v in
                                                               cands.items()}},
                     flipped_axes_zyx=list(axes))
            if "relion" in maps:
                c["corr_relion"] = corrs(maps["cryodrgn"], maps["relion"])
            c["corr_ours_unregularised"] = corrs(maps["cryodrgn"], maps["ours_unregularised"])
            halves = [flip_about_centre(read_map(p)[0], axes) for p in c["half_maps"]
                      if Path(p).is_file()]
            for h, v in zip("ab", halves):
                rows[f"cryoDRGN half_map_{h} (even/odd split)"] = {"fsc_truth_05_A": res(v)}

    # --- diagnostics: what separates our unregularised map from RELION's
    diag = {}
    if not args.no_diagnostics and "relion" in maps:
        ours_u, rel = maps["ours_unregularised"], maps["relion"]
        lp = box / 2 - 1
        ours_t = maps["ours_unregularised_lt_nyquist"] * relion_mask

        def steps_vs(peer):
            """Correlations of our unregularised map with ``peer`` after each RELION step."""
            return {
                "raw": corrs(ours_u, peer),
                "ours x RELION corner mask (r=D/2, 3 px edge)": corrs(ours_u * relion_mask, peer),
                "ours |k|<D/2 only, x corner mask (RELION's steps)": corrs(ours_t, peer),
                f"+ both low-passed |k| < {lp:g} px": corrs(
                    lowpass_hard(ours_u * relion_mask, lp), lowpass_hard(peer, lp)),
            }

        diag["ours_unregularised_vs_relion"] = {
            **steps_vs(rel), "fsc_per_shell": fsc(ours_u, rel).round(4).tolist()}
        if "relion_skip_gridding" in maps:
            rs = maps["relion_skip_gridding"]
            diag["ours_unregularised_vs_relion_skip_gridding"] = {
                **steps_vs(rs), "fsc_truth_05_A": res(rs)}
        diag["fsc_truth_05_A_ours_unregularised_x_corner_mask"] = res(ours_u * relion_mask)
        diag["fsc_truth_05_A_ours_unregularised_lt_nyquist_x_corner_mask"] = res(ours_t)
        diag["fsc_truth_05_A_ours_map_x_corner_mask"] = res(maps["ours_map"] * relion_mask)
        if "relion_fsc" in maps:
            diag["regularised_vs_relion_fsc"] = {
                "ours map.mrc (SSNR 2F/(1-F))": corrs(maps["ours_map"], maps["relion_fsc"]),
                "ours with RELION's SSNR c/(1-c), c=sqrt(2F/(1+F))": corrs(
                    maps["ours_relion_ssnr"], maps["relion_fsc"]),
                "same x RELION corner mask": corrs(maps["ours_relion_ssnr"] * relion_mask,
                                                   maps["relion_fsc"]),
                "fsc_truth_05_A_ours_with_relion_ssnr": res(maps["ours_relion_ssnr"]),
            }
        diag["noise_free_convention_check"] = noise_free_check(
            truth, px, args, relion, work, with_cryodrgn=box == min(args.boxes))

    return {"box": box, "n_particles": n, "snr": args.snr, "pixel_size_A": px,
            "map": str(map_path), "simulate_s": t_sim, "export_star_s": t_export,
            "star": str(star), "rows": rows, "diagnostics": diag}


def noise_free_check(truth, px, args, relion: Relion, work: Path, with_cryodrgn: bool) -> dict:
    """Noise-free particles (CTF, shifts and scales on): ours vs RELION isolates the conventions
    (Euler angles, origins, CTF, scale factor) from the handling of noise. With cryoDRGN: which
    mirror/shift of its map matches RELION's (done at the smallest box only; it is slow)."""
    from dask_refine.core.backprojection import FourierSums, backproject_particles
    from dask_refine.core.fsc import fsc
    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.core.reconstruction import reconstruct
    from dask_refine.io.mrc import read_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.star import export_star
    from dask_refine.jobs.reconstruct import load_pose_metadata

    box = truth.shape[0]
    n = args.convention_n
    d = work / "noise_free"
    store = simulate_store(truth, px, d / "particles.zarr",
                           SimulationConfig(n_particles=n, snr=math.inf, seed=args.seed + 7,
                                            chunk_size=args.chunk_size), write_poses=True)
    star = export_star(store, d / "star" / "particles.star")
    meta = load_pose_metadata(store, True)
    sums = backproject_particles(FourierSums.zeros(1, box), store.images[:], meta,
                                 np.zeros(n, np.int64), px)
    ours = reconstruct(sums.data[0], sums.weight[0], box)
    r = relion.run(star, star.parent / "relion.mrc", px)
    if "error" in r:
        return {"error": r["error"]}
    rel = read_map(r["map"])[0]
    curve = fsc(ours, rel)
    mask = soft_sphere_mask(box, 0.4 * box, 3.0)
    cryo = {}
    if with_cryodrgn and not args.no_cryodrgn and CRYODRGN.exists():
        c = cryodrgn_run(star, star.with_suffix(".mrcs"), box, px, d / "cryodrgn")
        if "error" in c:
            cryo = {"error": c["error"]}
        else:
            cmap = read_map(c["map"])[0]
            cands = {str(axes): correlation(flip_about_centre(cmap, axes), rel)
                     for axes in ((), (0,), (1,), (2,), (0, 1, 2))}
            cands.update({f"roll {ax} {s:+d}": correlation(np.roll(cmap, s, ax), rel)
                          for ax in range(3) for s in (-1, 1)})
            ccurve = fsc(cmap, rel)
            cryo = {"corr_vs_relion_by_transform": cands,
                    "best": max(cands, key=cands.get),
                    "min_fsc_vs_relion_shells_1_to_Dhalf_minus_2":
                        float(ccurve[1:box // 2 - 1].min())}
    return {"n_particles": n, "cryodrgn": cryo,
            "corr_whole": correlation(ours, rel),
            "corr_masked_0.4D": correlation(ours, rel, mask),
            "corr_ours_x_corner_mask": correlation(ours * soft_sphere_mask(box, box / 2, 3.0),
                                                   rel),
            "min_fsc_shells_1_to_Dhalf_minus_2": float(curve[1:box // 2 - 1].min()),
            "fsc_at_nyquist": float(curve[box // 2])}


# ----------------------------------------------------------------------------- report
def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v == v else "—"


def print_table(results: dict, args):
    print(f"\nReconstruction from known poses: SNR {args.snr:g}, CTF on, {args.workers} cores "
          f"(ours: LocalCluster {args.workers} processes × 1 thread, warm).")
    print("corr RELION = real-space Pearson with RELION's map of the same kind "
          "(whole box / soft sphere r=0.4·D).")
    head = (f"{'method':48s} {'box':>4s} {'N':>5s} {'wall s':>7s} {'images/s':>9s} "
            f"{'FSC-truth@0.5 Å':>15s} {'corr RELION':>15s}")
    print(head)
    print("-" * len(head))
    for case in results.values():
        if "rows" not in case:
            continue
        for name, row in case["rows"].items():
            if row is None:
                continue
            if "error" in row:
                print(f"{name:48s} {case['box']:4d} {case['n_particles']:5d}  skipped: "
                      f"{row['error'][:120]}")
                continue
            c = row.get("corr_relion")
            corr = f"{c['whole']:.4f}/{c['masked_0.4D']:.4f}" if c else (
                f"{row['corr_relion_1process']:.4f} (vs 1p)" if "corr_relion_1process" in row
                else "—")
            wall = fmt(row.get("wall_s"), "7.2f")
            rate = fmt(row.get("images_per_s"), "9.0f")
            res = fmt(row.get("fsc_truth_05_A"), "15.2f")
            print(f"{name:48s} {case['box']:4d} {case['n_particles']:5d} "
                  f"{wall:>7s} {rate:>9s} {res:>15s} {corr:>15s}")
        cd = case["rows"].get("cryoDRGN backproject_voxel", {})
        notes = [f"simulate {case['simulate_s']:.1f} s, "
                 f"export STAR+mrcs {case['export_star_s']:.1f} s"]
        if "parse_s" in cd:
            notes.append(f"cryoDRGN parse_pose_star+parse_ctf_star {cd['parse_s']:.1f} s; "
                         f"its own timer {cd.get('self_reported_backprojection_s')} s; "
                         f"map flipped along axes (z,y,x) {cd['flipped_axes_zyx'] or 'none'}")
        print("   " + "; ".join(notes))
    print()
    for key, case in results.items():
        diag = case.get("diagnostics") or {}
        if not diag:
            continue
        print(f"Diagnostics {key}:")
        nf = diag.get("noise_free_convention_check", {})
        if "corr_whole" in nf:
            print(f"  noise-free ({nf['n_particles']} particles): ours vs RELION corr "
                  f"{nf['corr_whole']:.4f} whole / {nf['corr_masked_0.4D']:.4f} masked / "
                  f"{nf['corr_ours_x_corner_mask']:.4f} with RELION's corner mask; "
                  f"min FSC shells 1…D/2−2 {nf['min_fsc_shells_1_to_Dhalf_minus_2']:.4f}, "
                  f"at Nyquist {nf['fsc_at_nyquist']:.3f}")
            cr = nf.get("cryodrgn") or {}
            if "best" in cr:
                t = cr["corr_vs_relion_by_transform"]
                low = cr["min_fsc_vs_relion_shells_1_to_Dhalf_minus_2"]
                print(f"  noise-free cryoDRGN vs RELION: as written {t['()']:.4f}, best transform "
                      f"{cr['best']!r} {t[cr['best']]:.4f}, mirrored z {t['(0,)']:.4f}, inverted "
                      f"{t['(0, 1, 2)']:.4f}; min FSC {low:.4f}")
        for group in ("ours_unregularised_vs_relion", "ours_unregularised_vs_relion_skip_gridding",
                      "regularised_vs_relion_fsc"):
            if group in diag:
                print(f"  {group}:")
                for k, v in diag[group].items():
                    if isinstance(v, dict):
                        print(f"    {k:55s} {v['whole']:.4f} / {v['masked_0.4D']:.4f}")
                    elif isinstance(v, float):
                        print(f"    {k:55s} {v:.2f}")
        for k in ("fsc_truth_05_A_ours_unregularised_x_corner_mask",
                  "fsc_truth_05_A_ours_unregularised_lt_nyquist_x_corner_mask",
                  "fsc_truth_05_A_ours_map_x_corner_mask"):
            if k in diag:
                print(f"  {k}: {diag[k]:.2f} Å")


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    p.add_argument("--n64", type=int, default=2000, help="particles at box 64 (default 2000)")
    p.add_argument("--n128", type=int, default=1000, help="particles at box 128 (default 1000)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2, help="our Dask workers = RELION MPI ranks")
    p.add_argument("--chunk-size", type=int, default=500, help="particles per store chunk")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per program (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convention-n", type=int, default=1000,
                   help="particles in the noise-free convention check")
    p.add_argument("--data-dir", default=None, help="folder with 1tii_{64_2.0,128_1.0}.mrc")
    p.add_argument("--work-dir", default=str(HERE / "results" / "reconstruct"))
    p.add_argument("--json", default=str(HERE / "results" / "reconstruct.json"))
    p.add_argument("--no-relion", action="store_true")
    p.add_argument("--no-mpi", action="store_true", help="skip mpirun relion_reconstruct_mpi")
    p.add_argument("--no-cryodrgn", action="store_true")
    p.add_argument("--no-diagnostics", action="store_true")
    args = p.parse_args(argv)

    from distributed import Client, LocalCluster

    relion = Relion(args.workers, use_mpi=not args.no_mpi)
    if args.no_relion:
        relion.exe = None
    n_of = {64: args.n64, 128: args.n128}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address=None)
    client = Client(cluster)
    t_cluster = time.perf_counter() - t0
    print(f"LocalCluster ({args.workers} workers × 1 thread) started in {t_cluster:.1f} s",
          flush=True)
    results = {"_meta": {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                         "cluster_start_s": t_cluster, "relion": relion.version,
                         "cryodrgn": str(CRYODRGN) if CRYODRGN.exists() else None,
                         "args": vars(args)}}
    try:
        # warm-up: imports, Numba compilation and worker start-up are not counted
        from dask_refine.io.mrc import read_map
        from dask_refine.io.simulate import SimulationConfig, simulate_store
        t0 = time.perf_counter()
        for box in args.boxes:
            path = find_map(box, args.data_dir)
            if path is None:
                continue
            vol, px = read_map(path)
            wdir = Path(args.work_dir) / f"warmup{box}"
            shutil.rmtree(wdir, ignore_errors=True)
            st = simulate_store(vol, px, wdir / "p.zarr",
                                SimulationConfig(n_particles=64, snr=args.snr, chunk_size=32),
                                write_poses=True)
            run_ours(st, wdir / "out", args.workers, client, 1)
        results["_meta"]["warmup_s"] = time.perf_counter() - t0
        print(f"warm-up done in {results['_meta']['warmup_s']:.1f} s", flush=True)
        for box in args.boxes:
            results[f"box{box}_n{n_of[box]}"] = run_case(box, n_of[box], args, client, relion)
    finally:
        client.close()
        cluster.close()
    results["_meta"]["relion_mpi_used"] = bool(relion.mpi_ok)
    cases = {k: v for k, v in results.items() if not k.startswith("_")}
    print_table(cases, args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(results), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
