"""Reference bias of a finished refinement of a simulated store: how much does each particle's
own contribution to its half's reference favour its current pose?

For a sample of half-A particles of iteration N of a run on a simulated store (the store's
ground truth is needed), the half references are rebuilt from the run's poses, scales and noise
model (best poses, FSC-regularised, masked as the job does), and

* the *self-term* ``S = E_loo − E`` at the particle's pose (its error under its half's reference
  rebuilt without it, minus under the reference with it) is compared with the closed form
  ``κ · 2 Σ_k w_k c_k² |r_k|² / (W_k + λ_k)`` (docs/design-notes.md, "Reference bias"): the
  fitted κ, its spread and the correlation;
* for particles > 20° off the truth, ``ΔE = E(best pose near the truth) − E(best pose near the
  refined one)`` (Powell minima, as ``oracle.py``) under their own half's reference, the same
  without their own contribution (leave-one-out), and the other half's reference: the fraction
  that prefers the truth under each.

    python benchmarks/reference_bias.py RUN_FOLDER --iteration 7 [--store P.zarr] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from oracle import _rotvec_matrix


def main():
    from dask_refine.core.backprojection import FourierSums, backproject_particles, particle_ctfs
    from dask_refine.core.fourier import centred_rfftn, rfft_frequencies, translate_rfft
    from dask_refine.core.fsc import fsc, ssnr_from_fsc
    from dask_refine.core.masks import soft_sphere_mask
    from dask_refine.core.noise import noise_weights
    from dask_refine.core.pose_search import ParticleData, pose_error
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.core.reconstruction import reconstruct, reconstruction_denominator
    from dask_refine.core.rotations import angular_distance_deg
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH, ParticleStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--store", type=Path, default=None,
                   help="the run's particle store (default: the store named in config.json)")
    p.add_argument("--sample", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    store_path = args.store or Path(json.loads((args.run / "config.json").read_text())["store"])
    store = ParticleStore.open(store_path)
    px, box, pad = store.info.pixel_size_A, store.info.box_size, 2
    folder = args.run / "iterations" / f"iter_{args.iteration:03d}"
    poses = np.load(folder / "poses.npz")
    r_align = json.loads((folder / "state.json").read_text())["r_align_used"]
    meta = store.metadata(["half_set", *CTF_COLUMNS])
    half = meta["half_set"]
    truth = {k: store.read_column(k, group=GROUND_TRUTH) for k in ("rotation", "shift_A")}
    refined = dict(meta, rotation=poses["rotation"], shift_A=poses["origin_px"] * px,
                   scale=poses["scale"])
    images = np.asarray(store.images[:])
    sums = FourierSums.zeros(2, box, pad)
    backproject_particles(sums, images, refined, half, px)
    sums = sums.completed(box)
    mask = soft_sphere_mask(box, 0.4 * box, soft_edge_px=max(3.0, 0.05 * box))
    halves = [reconstruct(sums.data[g], sums.weight[g], box, complete_planes=False)
              for g in (0, 1)]
    ssnr = ssnr_from_fsc(fsc(halves[0] * mask, halves[1] * mask))

    def reference(data, weight):
        return prepare_reference_rfft((reconstruct(data, weight, box, ssnr=ssnr,
                                                   complete_planes=False) * mask)
                                      .astype(np.float32), pad)

    refs = [reference(sums.data[g], sums.weight[g]) for g in (0, 1)]
    # the reconstruction's divisor W + λ at the particle's slice (the first-order share of its
    # own insertion in the reference is c·r / (W + λ))
    denominator = reconstruction_denominator(sums.weight[0], box, ssnr).astype(np.complex64)
    w = noise_weights(poses["sigma2"], box)
    ky, kx = np.broadcast_arrays(*rfft_frequencies(box, 2))
    band = kx ** 2 + ky ** 2 < r_align ** 2
    err = angular_distance_deg(poses["rotation"], truth["rotation"])
    rng = np.random.default_rng(0)
    in_a = np.flatnonzero(half == 0)
    off = np.flatnonzero((err > 20) & (half == 0))
    sample = np.union1d(rng.choice(in_a, min(args.sample, in_a.size), replace=False),
                        rng.choice(off, min(args.sample, off.size), replace=False))

    def best_near(ref, data, r0, o0):
        def cost(q):
            return pose_error(ref, data, (r0 @ _rotvec_matrix(q[:3]))[None], (o0 + q[3:])[None],
                              r_align)[0]
        return minimize(cost, np.zeros(5), method="Powell",
                        options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": 400}).fun

    rows = []
    for i in sample:
        one = FourierSums.zeros(1, box, pad)
        backproject_particles(one, images[i:i + 1], {k: v[i:i + 1] for k, v in refined.items()},
                              np.zeros(1, int), px)
        one = one.completed(box)
        loo = reference(sums.data[0] - one.data[0], sums.weight[0] - one.weight[0])
        ctf = particle_ctfs({k: meta[k][i:i + 1] for k in CTF_COLUMNS}, box, px)
        x = centred_rfftn(images[i:i + 1], 2)
        data = ParticleData(x, ctf, poses["scale"][i:i + 1], w)
        rot, origin = poses["rotation"][i:i + 1], poses["origin_px"][i:i + 1]
        self_term = (pose_error(loo, data, rot, origin, r_align)[0]
                     - pose_error(refs[0], data, rot, origin, r_align)[0])
        c = poses["scale"][i] * ctf[0]
        residual = translate_rfft(x, origin)[0] - c * extract_central_slices_rfft(refs[0], rot,
                                                                                  box)[0]
        d = np.real(extract_central_slices_rfft(denominator, rot, box)[0])
        formula = 2 * np.sum((w * c ** 2 * np.abs(residual) ** 2 / np.maximum(d, 1e-12))[band])
        row = {"particle": int(i), "error_deg": float(err[i]), "self_term": float(self_term),
               "formula_kappa_1": float(formula)}
        if err[i] > 20:
            for name, ref in (("own", refs[0]), ("leave_one_out", loo), ("other_half", refs[1])):
                row[f"dE_{name}"] = float(best_near(ref, data, truth["rotation"][i],
                                                    truth["shift_A"][i] / px)
                                          - best_near(ref, data, poses["rotation"][i],
                                                      poses["origin_px"][i]))
        rows.append(row)
    s = np.array([r["self_term"] for r in rows])
    a = np.array([r["formula_kappa_1"] for r in rows])
    kappa = s / a
    result = {"run": str(args.run), "iteration": args.iteration, "r_align": r_align,
              "n_sample": len(rows), "off_fraction_half_A": float(off.size / in_a.size),
              "self_term_mean": float(s.mean()), "self_term_sd": float(s.std()),
              "kappa_mean": float(kappa.mean()), "kappa_cv": float(kappa.std() / kappa.mean()),
              "formula_correlation": float(np.corrcoef(s, a)[0, 1]), "rows": rows}
    print(f"iteration {args.iteration}, band {r_align:.1f} shells, {len(rows)} half-A particles "
          f"({100 * result['off_fraction_half_A']:.1f}% of half A > 20° off)")
    print(f"self-term E_loo − E at the refined pose: {s.mean():.2f} ± {s.std():.2f}; "
          f"closed form: κ = {kappa.mean():.3f} (CV {result['kappa_cv']:.3f}), "
          f"correlation {result['formula_correlation']:.3f}")
    flipped = [r for r in rows if "dE_own" in r]
    if flipped:
        print(f"\n{len(flipped)} particles > 20° off: ΔE = E(near truth) − E(near refined pose)")
        print(f"{'reference':16s} {'median ΔE':>10s} {'prefer truth':>13s}")
        for name in ("own", "leave_one_out", "other_half"):
            de = np.array([r[f"dE_{name}"] for r in flipped])
            result[f"prefer_truth_{name}"] = float(np.mean(de < 0))
            result[f"median_dE_{name}"] = float(np.median(de))
            print(f"{name:16s} {np.median(de):10.2f} {100 * np.mean(de < 0):12.0f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
