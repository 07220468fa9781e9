"""CTF refinement benchmark: Homogeneous Refinement with and without ``--per-particle-defocus
--per-group-ctf`` on particles whose filed defocus is wrong and whose beam tilt is unknown, and
RELION 3.1's ``relion_ctf_refine`` on the same refined particles.

Simulates particles (box 64 map, CTF, origins ±4 Å) imaged with their true defocus and a beam
tilt, but files each defocus off by a Gaussian error (``--defocus-error-A``, default 400 Å) and
no tilt, as a CTF fit on thick ice and a microscope nobody measured would. Both refinements
start from the truth low-passed to 30 Å. Prints a table (and writes JSON to
``benchmarks/results/ctf_refine_<case>.json``): gold-standard and FSC-to-truth (0.5)
resolution, median pose error, the RMS defocus error left (refined − true, U and V), the beam
tilt found, wall time; beside the known-pose maps with the true and with the filed CTF (what
CTF refinement can at best give back) and the *oracle* defocus and tilt (fitted against the
true map at the true poses: what the data allow, :func:`ctf_oracle`). RELION's ``relion_ctf_refine`` (``--fit_defocus
--bf_only --bf_range R`` per particle, and ``--fit_beamtilt``) gets our uncorrected run's
particles, half maps and a ``relion_postprocess`` FSC; its RMS defocus error and beam tilt are
read from its output STAR. ``--mag-matrix`` also images the particles under an (anisotropic)
magnification filed as the identity: the table then gives each run's refined matrix, and
RELION's runs ``--fit_aniso`` too.

    python benchmarks/ctf_refine.py                      # 2,000 particles, SNR 0.1
    python benchmarks/ctf_refine.py --mag-matrix 1.01 0 0 0.99   # and a 2% anisotropy
    python benchmarks/ctf_refine.py --n 300 --max-iterations 2 --skip-relion   # quick check
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from peers import relion_program
from refine import fsc_truth, run_ours

HERE = Path(__file__).resolve().parent


def known_pose_map(store, px, path, ctf_from_truth: bool):
    """The reconstruction at the true poses, with the true CTF (defocus and tilt) or the
    filed one; written to ``path``."""
    from dask_refine.core.backprojection import FourierSums, backproject_particles
    from dask_refine.io.mrc import write_map
    from dask_refine.io.store import GROUND_TRUTH
    from dask_refine.jobs.ctf_refinement import image_model, load_optics
    from dask_refine.jobs.reconstruct import reconstruct_halves_and_full

    meta = load_optics(store)
    if ctf_from_truth:
        for name in ("defocus_u_A", "defocus_v_A", "beam_tilt_mrad", "mag_matrix"):
            if store.has_column(name, group=GROUND_TRUTH):
                meta[name] = store.read_column(name, group=GROUND_TRUTH)
    model = image_model(meta)
    for name in ("rotation", "shift_A", "scale"):
        model[name] = store.read_column(name, group=GROUND_TRUTH)
    half = store.read_column("half_set")
    sums = FourierSums.zeros(2, store.info.box_size)
    step = 500
    for start in range(0, half.size, step):
        rows = slice(start, start + step)
        backproject_particles(sums, store.images[rows], {k: v[rows] for k, v in model.items()},
                              half[rows], px, first_index=start)
    write_map(path, reconstruct_halves_and_full(sums, store.info.box_size, px)[2], px)
    return path


def ctf_oracle(store, truth, px, r_max: float, range_A: float) -> dict:
    """What the data allow: each particle's defocus fitted by the job's own search against the
    true map at its true pose and origin (true tilt applied), and the tilt fitted from all the
    particles' phase sums (true defocus), over ``|k| < r_max``."""
    from dask_refine.core.aberrations import magnified_rotations
    from dask_refine.core.backprojection import observed_rfft, particle_ctfs
    from dask_refine.core.ctf_refine import fit_beam_tilt, phase_sums, refine_defocus
    from dask_refine.core.fourier import translate_rfft
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.io.store import GROUND_TRUTH
    from dask_refine.jobs.ctf_refinement import image_model, load_optics

    box = store.info.box_size
    reference = prepare_reference_rfft(truth)
    meta = load_optics(store)
    gt = {k: store.read_column(k, group=GROUND_TRUTH) for k in
          ("rotation", "shift_A", "scale", "defocus_u_A", "defocus_v_A", "beam_tilt_mrad",
           "mag_matrix") if store.has_column(k, group=GROUND_TRUTH)}
    weight = np.full((box, box // 2 + 1), 1.0 / box ** 2)  # unit-variance pixel noise
    offsets, z = [], 0
    for start in range(0, store.info.n_particles, 100):
        rows = slice(start, start + 100)
        filed = {k: v[rows] for k, v in meta.items()}
        if "mag_matrix" in gt:  # the true magnification, as the true tilt
            filed["mag_matrix"] = gt["mag_matrix"][rows]
        model = image_model(dict(filed, beam_tilt_mrad=gt["beam_tilt_mrad"][rows]))
        slices = extract_central_slices_rfft(
            reference, magnified_rotations(gt["rotation"][rows], model), box)
        x = translate_rfft(observed_rfft(store.images[rows], model, px), gt["shift_A"][rows] / px)
        offsets.append(refine_defocus(x, slices, model, gt["scale"][rows], weight, px, r_max,
                                      range_A))
        untilted = image_model(dict(filed, defocus_u_A=gt["defocus_u_A"][rows],
                                    defocus_v_A=gt["defocus_v_A"][rows]))
        x = translate_rfft(observed_rfft(store.images[rows], untilted, px),
                           gt["shift_A"][rows] / px)
        z = z + phase_sums(x, gt["scale"][rows][:, None, None]
                           * particle_ctfs(untilted, box, px) * slices, weight)
    offset = np.concatenate(offsets)
    tilt = fit_beam_tilt(z, box, px, float(meta["cs_mm"][0]), float(meta["voltage_kV"][0]),
                         r_max)
    return {"rms_defocus_error_A": rms_defocus_error(meta["defocus_u_A"] + offset[:, 0],
                                                     meta["defocus_v_A"] + offset[:, 1], store),
            "beam_tilt_mrad": tilt.tolist()}


def mag_matrix(optics) -> list | None:
    """The first optics group's magnification matrix ``[M00, M01, M10, M11]`` (None if none)."""
    labels = ["rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11"]
    if not set(labels) <= set(optics.columns):
        return None
    return optics[labels].to_numpy(float)[0].tolist()


def rms_defocus_error(defocus_u, defocus_v, store) -> float:
    from dask_refine.io.store import GROUND_TRUTH

    du = np.asarray(defocus_u) - store.read_column("defocus_u_A", group=GROUND_TRUTH)
    dv = np.asarray(defocus_v) - store.read_column("defocus_v_A", group=GROUND_TRUTH)
    return float(np.sqrt(np.mean(0.5 * (du * du + dv * dv))))


def run_relion_ctf_refine(folder: Path, run: Path, px: float, box: int, range_A: float,
                          threads: int = 2, fit_aniso: bool = False) -> dict:
    """``relion_postprocess`` on the run's half maps, then ``relion_ctf_refine`` on its
    particles: per-particle brute-force defocus and the beam tilt. Returns the refined STAR's
    path and the wall time, or the error."""
    import starfile

    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.io.mrc import write_map

    folder.mkdir(parents=True, exist_ok=True)
    mask = folder / "mask.mrc"
    write_map(mask, soft_sphere_mask(box, 0.4 * box, soft_edge_px=6.0).astype(np.float32), px)
    star = folder / "particles.star"
    shutil.copyfile(run / "particles.star", star)
    stack = run / "particles.mrcs"
    if stack.exists():  # the simulated images the run wrote beside its STAR
        shutil.copyfile(stack, folder / "particles.mrcs")
    # RELION 3.1 groups particles by micrograph: one per particle here (per-particle fits)
    optics, particles = starfile.read(star).values()
    particles["rlnMicrographName"] = [f"mic{i:06d}.mrc" for i in range(len(particles))]
    starfile.write({"optics": optics, "particles": particles}, star)
    t0 = time.perf_counter()
    steps = [
        ["relion_postprocess", "--i", str(run / "half_A.mrc"), "--i2", str(run / "half_B.mrc"),
         "--mask", str(mask), "--angpix", f"{px}", "--o", str(folder / "postprocess")],
        ["relion_ctf_refine", "--i", str(star), "--f", str(folder / "postprocess.star"),
         "--m1", str(run / "half_A.mrc"), "--m2", str(run / "half_B.mrc"), "--mask", str(mask),
         "--o", str(folder / "out") + "/", "--fit_defocus", "--bf_only", "--bf_range",
         f"{range_A:g}", "--fit_beamtilt", "--kmin_tilt", "20", "--kmin_defocus", "30",
         "--angpix_ref", f"{px}", "--j", str(threads)] + (["--fit_aniso"] if fit_aniso else []),
    ]
    for cmd in steps:
        program = relion_program(cmd[0])
        if program is None:
            return {"error": f"{cmd[0]} not found"}
        done = subprocess.run([program, *cmd[1:]], capture_output=True, text=True, cwd=folder,
                              check=False)
        if done.returncode != 0:
            return {"error": (done.stdout + done.stderr)[-2000:], "command": " ".join(cmd)}
    out = sorted((folder / "out").glob("*.star"))
    refined = [p for p in out if p.name.startswith("particles_ctf_refine")] or out
    return {"star": str(refined[0]), "wall_s": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map", default=str(HERE.parent.parent / "shared" / "data"
                                        / "7pbl_64_2.4.mrc"))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--defocus-error-A", type=float, default=400.0)
    p.add_argument("--beam-tilt-mrad", type=float, nargs=2, default=(3.0, -2.0))
    p.add_argument("--mag-matrix", type=float, nargs=4, default=(1.0, 0.0, 0.0, 1.0),
                   metavar=("M00", "M01", "M10", "M11"),
                   help="image the particles under this magnification matrix, filed as the "
                   "identity (RELION then also runs --fit_aniso)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-iterations", type=int, default=10)
    p.add_argument("--first-level-candidates", type=int, default=2048,
                   help="the job's setting (default: %(default)s; SNR 0.1 needs fewer than "
                   "the job's 8,192)")
    p.add_argument("--skip-relion", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(HERE / "results" / "ctf_refine"))
    args = p.parse_args()

    from dask_refine.core.rotations import angular_distance_deg
    from dask_refine.io.mrc import read_map, write_map
    from dask_refine.io.simulate import SimulationConfig, simulate_store
    from dask_refine.io.store import GROUND_TRUTH

    truth, px = read_map(args.map)
    box = truth.shape[0]
    name = (f"box{box}_n{args.n}_snr{args.snr:g}_df{args.defocus_error_A:g}"
             + ("" if tuple(args.mag_matrix) == (1.0, 0.0, 0.0, 1.0) else "_mag"))
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = simulate_store(truth, px, work / "particles.zarr", SimulationConfig(
        n_particles=args.n, snr=args.snr, chunk_size=250, shift_sigma_A=2.0, seed=args.seed,
        defocus_error_A=args.defocus_error_A, beam_tilt_mrad=tuple(args.beam_tilt_mrad),
        mag_matrix=tuple(args.mag_matrix)))
    # the tilt (and magnification) are unknown to the user: filed as none, the truth aside
    unknown = ["beam_tilt_mrad"] + (["mag_matrix"] if store.has_column("mag_matrix") else [])
    for column in unknown:
        store.write_column(column, store.read_column(column), group=GROUND_TRUTH)
    store.write_column("beam_tilt_mrad", np.zeros((args.n, 2)))
    if "mag_matrix" in unknown:
        store.write_column("mag_matrix", np.tile(np.eye(2), (args.n, 1, 1)))
    initial = work / "initial.mrc"
    write_map(initial, truth, px)
    rows = {}
    for label, from_truth in (("known poses, true CTF", True), ("known poses, filed CTF", False)):
        path = known_pose_map(store, px, work / f"known_{'true' if from_truth else 'filed'}.mrc",
                              from_truth)
        rows[label] = {"fsc_truth_05_A": fsc_truth(path, truth, px)}
    filed = rms_defocus_error(store.read_column("defocus_u_A"), store.read_column("defocus_v_A"),
                              store)
    rows["known poses, filed CTF"]["rms_defocus_error_A"] = filed
    for shell in (0.3, 0.4, 0.5):  # the band at 8, 6, 4.8 Å for box 64 at 2.4 Å/px
        r_max = shell * box
        rows[f"oracle: true map and poses, band {box * px / r_max:.1f} Å"] = ctf_oracle(
            store, truth, px, r_max, 5 * args.defocus_error_A)
    gt = store.read_column("rotation", group=GROUND_TRUTH)
    import starfile

    for label, options in (("refine", {}),
                           ("refine --per-particle-defocus --per-group-ctf",
                            {"per_particle_defocus": True, "per_group_ctf": True})):
        folder = work / ("plain" if not options else "ctf_refined")
        summary = run_ours(work / "particles.zarr", initial, folder, args.workers,
                           args.max_iterations, first_level_candidates=args.first_level_candidates,
                           **options)
        optics, particles = starfile.read(folder / "particles.star").values()
        poses = np.load(folder / "iterations" / f"iter_{summary['iterations']:03d}" / "poses.npz")
        rows[label] = {
            "gold_standard_A": summary["resolution_A"],
            "fsc_truth_05_A": fsc_truth(folder / "map.mrc", truth, px),
            "median_angular_error_deg": float(np.median(angular_distance_deg(poses["rotation"],
                                                                              gt))),
            "rms_defocus_error_A": rms_defocus_error(particles["rlnDefocusU"],
                                                     particles["rlnDefocusV"], store),
            "beam_tilt_mrad": (optics[["rlnBeamTiltX", "rlnBeamTiltY"]].to_numpy(float)[0]
                               .tolist() if "rlnBeamTiltX" in optics else [0.0, 0.0]),
            "mag_matrix": mag_matrix(optics),
            "iterations": summary["iterations"], "wall_s": summary["wall_s"]}
    if not args.skip_relion:
        rel = run_relion_ctf_refine(work / "relion_ctf_refine", work / "plain", px, box,
                                    5 * args.defocus_error_A,
                                    fit_aniso="mag_matrix" in unknown)
        if "error" in rel:
            rows["relion_ctf_refine"] = rel
        else:
            optics, particles = starfile.read(rel["star"]).values()
            rows["RELION 3.1 relion_ctf_refine (on the refine run)"] = {
                "rms_defocus_error_A": rms_defocus_error(particles["rlnDefocusU"],
                                                         particles["rlnDefocusV"], store),
                "beam_tilt_mrad": (optics[["rlnBeamTiltX", "rlnBeamTiltY"]].to_numpy(float)[0]
                                   .tolist() if "rlnBeamTiltX" in optics else None),
                "mag_matrix": mag_matrix(optics), "wall_s": rel["wall_s"]}
    result = {"map": args.map, "n": args.n, "snr": args.snr,
              "defocus_error_A": args.defocus_error_A, "beam_tilt_mrad": args.beam_tilt_mrad,
              "mag_matrix": args.mag_matrix, "rows": rows}
    out = HERE / "results" / f"ctf_refine_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{args.n} particles, SNR {args.snr:g}, defocus filed with {args.defocus_error_A:g} Å "
          f"RMS error, beam tilt {tuple(args.beam_tilt_mrad)} mrad filed as none\n")
    print(f"| {'run':<50} | gold-std | FSC-truth 0.5 | median pose err | RMS defocus err "
          "| beam tilt (mrad) | magnification | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    def cell(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "—"

    for label, row in rows.items():
        tilt = row.get("beam_tilt_mrad")
        print(f"| {label:<50} | {cell(row, 'gold_standard_A', '{:.2f} Å')} "
              f"| {cell(row, 'fsc_truth_05_A', '{:.2f} Å')} "
              f"| {cell(row, 'median_angular_error_deg', '{:.2f}°')} "
              f"| {cell(row, 'rms_defocus_error_A', '{:.0f} Å')} "
              f"| {'—' if tilt is None else f'({tilt[0]:.2f}, {tilt[1]:.2f})'} "
              f"| {'—' if not row.get('mag_matrix') else '(' + ', '.join(f'{v:.4f}' for v in row['mag_matrix']) + ')'} "
              f"| {cell(row, 'wall_s', '{:.0f} s')} |")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
