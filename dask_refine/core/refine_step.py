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


def refine_particles(sums: FourierSums, images, meta: dict, groups, references, envelopes,
                     noise_weight, params: SearchParams, pixel_size_A: float,
                     scale_max_shell: float, first_index: int = 0) -> StepResult:
    """Search, score and backproject a batch; ``sums`` is accumulated in place.

    ``meta``: CTF columns, ``scale (B,)`` (current scales, used for search and backprojection),
    ``origin_px (B, 2)`` (prior origins), and for local search ``rotation (B, 3, 3)`` (priors).
    ``groups`` ``(B,)``: the reference/sum index of each particle.
    """
    images = np.asarray(images, dtype=np.float32)
    n, box = images.shape[0], images.shape[-1]
    finite = np.isfinite(images).reshape(n, -1).all(axis=1)
    if not finite.all():
        raise ValueError(f"particle {first_index + int(np.flatnonzero(~finite)[0])} has NaN or "
                         "Inf pixels")
    x = centred_rfftn(images, 2)
    ctf = particle_ctfs(meta, box, pixel_size_A)
    scale = np.asarray(meta["scale"], np.float64)
    prior_origin = np.asarray(meta["origin_px"], np.float64)
    prior_rot = meta.get("rotation")
    groups = np.asarray(groups)
    out = StepResult(np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros(n),
                     np.zeros(n, np.int64), np.ones(n), np.zeros(box // 2 + 1),
                     np.zeros(box // 2 + 1))
    for g in np.unique(groups):
        sel = np.flatnonzero(groups == g)
        data = ParticleData(x[sel], ctf[sel], scale[sel], noise_weight)
        res = branch_and_bound(references[g], data, params,
                               prior_rotation=None if prior_rot is None else prior_rot[sel],
                               prior_origin_px=prior_origin[sel], envelope=envelopes[g])
        out.rotation[sel] = res.rotation
        out.origin_px[sel] = res.origin_px
        out.error[sel] = res.error
        out.n_evaluations[sel] = res.n_evaluations
        centred = translate_rfft(x[sel], res.origin_px)
        model = ctf[sel] * extract_central_slices_rfft(references[g], res.rotation, box)
        out.scale_estimate[sel] = estimate_scales(centred, model, noise_weight, scale_max_shell)
        s = scale[sel].reshape(-1, 1, 1)
        p_sum, p_count = shell_power_sums(centred - s * model)
        out.noise_sums += p_sum
        out.noise_counts += p_count
        weight = (s * ctf[sel]).astype(np.float32)
        insert_central_slices_rfft((centred * weight).astype(np.complex64), weight * weight,
                                   res.rotation, sums.data[g], sums.weight[g])
        sums.count[g] += sel.size
    return out
