"""The oracle of a low-SNR refinement benchmark: how well can a particle's pose be known at all?

For a sample of a simulated store's particles, the reference is the reconstruction of the
*other* half set from its true poses (gold-standard: a particle never sees a map it is in), the
noise model the per-shell power of the true-pose residuals, and each particle's pose the
continuous minimum of the engine's own error (:func:`dask_refine.core.pose_search.pose_error`,
noise-whitened, band ``r_align``) started at its true pose (Powell over a rotation vector and
the origin). The median angle between those minima and the truth is the best median pose error
a refinement can reach on these particles with a perfect reference: the target that
``benchmarks/refine.py`` compares the refined poses with.
"""

from __future__ import annotations

import numpy as np


def _rotvec_matrix(w):
    """Rotation matrix of a rotation vector ``w`` (radians), Rodrigues' formula."""
    theta = float(np.linalg.norm(w))
    if theta < 1e-12:
        return np.eye(3)
    k = np.asarray(w) / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


def true_pose_references(store, pixel_size_A: float, pad: int = 2, particles=None):
    """Half maps from the true poses, their FSC, the full map and the truth columns.

    ``particles``: ``(N,)`` bool, which particles to backproject (default: all), e.g. the
    non-junk ones of a realistic simulation.
    """
    from dask_refine.core.backprojection import FourierSums, backproject_particles
    from dask_refine.io.store import CTF_COLUMNS, GROUND_TRUTH
    from dask_refine.jobs.reconstruct import reconstruct_halves_and_full

    meta = store.metadata(["half_set", *CTF_COLUMNS])
    for k in ("rotation", "shift_A", "scale"):
        meta[k] = store.read_column(k, group=GROUND_TRUTH)
    sums = FourierSums.zeros(2, store.info.box_size, pad)
    n = store.info.n_particles
    for start in range(0, n, 1000):
        rows = slice(start, min(n, start + 1000))
        use = np.ones(rows.stop - start, bool) if particles is None else particles[rows]
        if not use.any():
            continue
        backproject_particles(sums, np.asarray(store.images[rows])[use],
                              {k: v[rows][use] for k, v in meta.items()},
                              meta["half_set"][rows][use], pixel_size_A)
    halves, curve, full = reconstruct_halves_and_full(sums, store.info.box_size, pixel_size_A)
    return halves, curve, full, meta


def oracle_pose_errors(store, pixel_size_A: float, n_sample: int = 200, margin_shells=4.0,
                       seed: int = 0, particles=None) -> dict:
    """Per-particle angle (°) between the truth and the continuous minimum of the error against
    the other half's true-pose reference (see the module docstring); also the band used.
    ``particles``: ``(N,)`` bool, the true particles (the references are built from them and
    the sample drawn among them; default all)."""
    from scipy.optimize import minimize

    from dask_refine.core.backprojection import particle_ctfs
    from dask_refine.core.fourier import centred_rfftn, translate_rfft
    from dask_refine.core.fsc import resolution_at_threshold
    from dask_refine.core.noise import noise_weights, shell_power_sums, sigma2_from_sums
    from dask_refine.core.pose_search import ParticleData, pose_error
    from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft
    from dask_refine.core.rotations import angular_distance_deg

    box = store.info.box_size
    halves, curve, _, meta = true_pose_references(store, pixel_size_A, particles=particles)
    res = resolution_at_threshold(curve, box, pixel_size_A, 0.143)
    r_align = float(min(box / 2 - 1, box * pixel_size_A / res + margin_shells))
    refs = [prepare_reference_rfft(h) for h in halves]
    rng = np.random.default_rng(seed)
    pool = (np.arange(store.info.n_particles) if particles is None
            else np.flatnonzero(particles))
    rows = np.sort(rng.choice(pool, min(n_sample, pool.size), replace=False))
    images = np.asarray(store.images.get_orthogonal_selection((rows, slice(None), slice(None))))
    sub = {k: v[rows] for k, v in meta.items()}
    x = centred_rfftn(images, 2)
    ctf = particle_ctfs(sub, box, pixel_size_A)
    origin = sub["shift_A"] / pixel_size_A
    # noise model: true-pose residuals against the other half's reference
    other = 1 - sub["half_set"]
    sums, counts = 0.0, 0.0
    for h in (0, 1):
        sel = np.flatnonzero(other == h)
        model = sub["scale"][sel, None, None] * ctf[sel] * extract_central_slices_rfft(
            refs[h], sub["rotation"][sel], box)
        s, c = shell_power_sums(translate_rfft(x[sel], origin[sel]) - model)
        sums, counts = sums + s, counts + c
    weights = noise_weights(sigma2_from_sums(sums, counts), box)
    errors = np.zeros(rows.size)
    for b in range(rows.size):
        data = ParticleData(x[b:b + 1], ctf[b:b + 1], sub["scale"][b:b + 1], weights)
        r0, o0 = sub["rotation"][b], origin[b]
        ref = refs[other[b]]

        def cost(p):
            rot = (r0 @ _rotvec_matrix(p[:3]))[None]
            return pose_error(ref, data, rot, (o0 + p[3:])[None], r_align)[0]

        found = minimize(cost, np.zeros(5), method="Powell",
                         options={"xtol": 1e-3, "ftol": 1e-4, "maxfev": 600})
        best = r0 @ _rotvec_matrix(found.x[:3])
        errors[b] = float(angular_distance_deg(best[None], r0[None])[0])
    return {"rows": rows, "error_deg": errors, "r_align": r_align,
            "true_pose_gold_standard_A": float(res)}
