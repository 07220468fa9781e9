"""One E-step on a batch of particles: search each particle's pose against its half set's
reference, measure residuals and scales at that pose, and backproject it (the map task of a
refinement iteration; pure, no I/O).

References are the padded centred rffts of :func:`.projection.prepare_reference_rfft`, one per
group (half set, or class × half). Poses follow :mod:`.pose_search` (origins in pixels,
RELION's convention); sums follow :mod:`.backprojection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import array_module, to_numpy
from .backprojection import FourierSums, particle_ctfs
from .fourier import centred_rfftn, translate_rfft
from .noise import estimate_scales, shell_power_sums
from .pose_search import ParticleData, SearchParams, branch_and_bound
from .projection import extract_central_slices_rfft, insert_central_slices_rfft


@dataclass
class StepResult:
    """Per-particle results of one E-step (rows in the batch's order) and shell statistics."""

    rotation: np.ndarray  # (B, 3, 3)
    origin_px: np.ndarray  # (B, 2)
    error: np.ndarray  # (B,)
    n_evaluations: np.ndarray  # (B,)
    scale_estimate: np.ndarray  # (B,)
    noise_sums: np.ndarray  # (D//2 + 1,)
    noise_counts: np.ndarray  # (D//2 + 1,)
    class_id: np.ndarray | None = None  # (B,) best class, heterogeneous refinement only
    class_weight: np.ndarray | None = None  # (B, K) posterior class probabilities


def class_posteriors(errors) -> np.ndarray:
    """Class probabilities ``(B, K)`` from the noise-weighted errors ``(B, K)`` at each class's
    best pose: the errors are −2 log-likelihoods, so ``p_k ∝ exp(−(E_k − min E) / 2)`` (equal
    class priors, RELION's maximum-a-posteriori weights)."""
    e = np.asarray(errors, np.float64)
    w = np.exp(-0.5 * (e - e.min(axis=1, keepdims=True)))
    return w / w.sum(axis=1, keepdims=True)


def refine_particles(sums: FourierSums, images, meta: dict, groups, references, envelopes,
                     noise_weight, params: SearchParams, pixel_size_A: float,
                     scale_max_shell: float, first_index: int = 0, n_classes: int = 1,
                     soft_classes: bool = False) -> StepResult:
    """Search, score and backproject a batch; ``sums`` is accumulated in place.

    ``meta``: CTF columns, ``scale (B,)`` (current scales, used for search and backprojection),
    ``origin_px (B, 2)`` (prior origins), and for local search ``rotation (B, 3, 3)`` (priors).
    ``groups`` ``(B,)``: the half set of each particle; references and sums are indexed
    ``class · 2 + half``. With ``n_classes`` > 1 every particle is searched against every class:
    hard assignment backprojects it into its best class; ``soft_classes`` into every class with
    its posterior probability (:func:`class_posteriors`), each at that class's best pose.

    Backend: the arrays' own. With CuPy references and sums (a GPU worker), the images are
    copied to the device and every transform, slice, GEMM and insertion runs there; per-particle
    results come back as host arrays. ``images`` may be host or device arrays.
    """
    xp = array_module(references[0])
    images = xp.asarray(images, dtype=xp.float32)
    n, box = images.shape[0], images.shape[-1]
    finite = to_numpy(xp.isfinite(images).reshape(n, -1).all(axis=1))
    if not finite.all():
        raise ValueError(f"particle {first_index + int(np.flatnonzero(~finite)[0])} has NaN or "
                         "Inf pixels")
    x = centred_rfftn(images, 2)
    ctf = particle_ctfs(meta, box, pixel_size_A, xp)
    noise_weight = xp.asarray(noise_weight)
    scale = np.asarray(meta["scale"], np.float64)
    prior_origin = np.asarray(meta["origin_px"], np.float64)
    prior_rot = meta.get("rotation")
    groups = np.asarray(groups)
    out = StepResult(np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros(n),
                     np.zeros(n, np.int64), np.ones(n), np.zeros(box // 2 + 1),
                     np.zeros(box // 2 + 1))
    if n_classes > 1:
        out.class_id = np.zeros(n, np.int64)
        out.class_weight = np.zeros((n, n_classes))
    for h in np.unique(groups):
        sel_host = np.flatnonzero(groups == h)
        sel = xp.asarray(sel_host)
        data = ParticleData(x[sel], ctf[sel], scale[sel_host], noise_weight)
        found = [branch_and_bound(references[2 * k + h], data, params,
                                  prior_rotation=None if prior_rot is None else prior_rot[sel],
                                  prior_origin_px=prior_origin[sel],
                                  envelope=envelopes[2 * k + h]) for k in range(n_classes)]
        errors = np.stack([r.error for r in found], axis=1)  # (b, K)
        best = np.argmin(errors, axis=1)
        pick = np.arange(sel_host.size)
        out.rotation[sel_host] = np.stack([r.rotation for r in found], axis=1)[pick, best]
        out.origin_px[sel_host] = np.stack([r.origin_px for r in found], axis=1)[pick, best]
        out.error[sel_host] = errors[pick, best]
        out.n_evaluations[sel_host] = sum(r.n_evaluations for r in found)
        posterior = class_posteriors(errors)
        if n_classes > 1:
            out.class_id[sel_host], out.class_weight[sel_host] = best, posterior
        # residuals, noise and scales at the best class's pose
        x_h, ctf_h = x[sel], ctf[sel]
        centred = translate_rfft(x_h, out.origin_px[sel_host])
        model = xp.zeros_like(centred)
        for k in range(n_classes):
            mine = np.flatnonzero(best == k)
            if mine.size:
                mine_d = xp.asarray(mine)
                model[mine_d] = ctf_h[mine_d] * extract_central_slices_rfft(
                    references[2 * k + h], out.rotation[sel_host][mine], box)
        out.scale_estimate[sel_host] = estimate_scales(centred, model, noise_weight,
                                                       scale_max_shell)
        s = xp.asarray(scale[sel_host]).reshape(-1, 1, 1)
        p_sum, p_count = shell_power_sums(centred - s * model)
        out.noise_sums += p_sum
        out.noise_counts += p_count
        weight = (s * ctf_h).astype(xp.float32)
        for k in range(n_classes):
            w_k = posterior[:, k] if soft_classes else (best == k).astype(np.float64)
            mine = np.flatnonzero(w_k > 1e-3)
            if mine.size == 0:
                continue
            mine_d = xp.asarray(mine)
            # hard assignment: the particle's best pose is class k's, already centred above
            at_k = (translate_rfft(x_h[mine_d], found[k].origin_px[mine]) if soft_classes
                    else centred[mine_d])
            wk = xp.asarray(w_k[mine].reshape(-1, 1, 1).astype(np.float32))
            w_mine = weight[mine_d]
            insert_central_slices_rfft((at_k * w_mine * wk).astype(xp.complex64),
                                       w_mine * w_mine * wk, found[k].rotation[mine],
                                       sums.data[2 * k + h], sums.weight[2 * k + h])
            sums.count[2 * k + h] += mine.size
    return out
