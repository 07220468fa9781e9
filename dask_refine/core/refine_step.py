"""One E-step on a batch of particles: search each particle's poses against its half set's
reference(s), weigh them by their posterior, measure residuals and scales over those poses, and
backproject the particle at each with its weight (the map task of a refinement iteration; pure,
no I/O).

References are the padded centred rffts of :func:`.projection.prepare_reference_rfft`, one per
group (half set, or class × half). Poses follow :mod:`.pose_search` (origins in pixels,
RELION's convention); sums follow :mod:`.backprojection`; posteriors :mod:`.posterior`.

**Marginalisation** (RELION's expectation step; docs/design-notes.md, "Marginalisation"): each
particle is backprojected at every *significant* pose ``j`` (the search's final poses, weighted by
``p_j ∝ exp(−E_j/2)``, kept up to ``significant_fraction`` of the mass), with data
``p_j · s C X̂_j`` and weight ``p_j · s² C²``; the noise power and the scale are the
posterior-weighted sums of the per-pose residuals and scale terms. With
``marginalize=False`` the posterior is a delta at the best pose (hard assignment), and the
result is exactly the classical one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .aberrations import magnified_rotations
from .backend import array_module, batch_size_for_memory, free_device_bytes, segment_sums, to_numpy
from .backprojection import FourierSums, observed_rfft, optics_meta, particle_ctfs
from .ctf_refine import even_sums, magnification_sums, phase_sums, refine_defocus
from .fourier import translate_rfft
from .noise import log_noise_normaliser, scale_from_terms, scale_terms, shell_power_sums
from .pose_search import ParticleData, SearchParams, band_pixels, branch_and_bound, pose_errors
from .posterior import class_evidence, significant_poses, softmax
from .projection import extract_central_slices_rfft, insert_central_slices_rfft
from .rotations import angular_distance_deg
from .symmetry import symmetry_operators


@dataclass(frozen=True)
class EStepOptions:
    """How the E-step weighs poses and classes.

    ``marginalize``: backproject over the significant poses with their posterior weights
    (False: at the best pose only). ``soft_classes``: the posterior runs over classes and poses
    together (False: each particle goes to its most probable class, and is marginalised over
    that class's poses). ``log_class_prior``: ``log π_k`` per class (None: uniform).
    ``max_significant_poses`` caps the poses of one particle (largest weights kept).
    ``backprojection_max_shell``: insert Fourier components only up to this radius (pixels;
    None: every one), RELION's ``current_size``: a reference holds no detail finer than the
    band its particles were aligned in (docs/design-notes.md, "The band grows with the resolution").
    ``cross_half_classes`` (several classes): a particle's evidence for each class is measured
    on the *other* half set's reference of that class, at the poses its own half's search
    found, so that no particle is classified by a map it is part of; poses are still searched
    and weighed within a class on the particle's own half (docs/design-notes.md,
    "Classes judged on the other half").
    ``random_class_seed``: instead of weighing classes, put each particle into one class drawn
    at random (uniformly, from the seed and the particle's index in the store, so the draw
    does not depend on how the particles are chunked), marginalised over that class's poses:
    RELION's random subsets, the first iteration of K classes started from one map.
    ``alignment_folds`` F: each half set is split into F folds, and a particle is searched
    against its half's reference rebuilt *without its fold* (so without itself: no self-term,
    docs/design-notes.md, "Leaving the particle's fold out"); references, envelopes and sums
    are then indexed ``(class · 2 + half) · F + fold`` and ``groups`` is ``half · F + fold``.
    F = 1: one reference per half (and class) that holds every particle of the half.
    CTF refinement at the best pose against the particle's own (fold-out) reference of its
    best class (:mod:`.ctf_refine`): ``defocus_range_A`` > 0 searches each particle's defocus
    offset within ± that range (``StepResult.defocus_offset_A``; U and V apart with
    ``defocus_astigmatism``); ``fit_beam_tilt`` sums the
    phase evidence (odd aberrations) and the γ evidence (even ones) per optics group
    (``meta["optics_group"]``, 0-based; ``StepResult.phase_sums``, ``StepResult.even_sums``);
    ``fit_magnification`` the normal equations of the anisotropic magnification
    (``StepResult.mag_sums``).
    ``relax_symmetry`` (a point group; local searches only): symmetry relaxation
    (cryoSPARC's "maximization", RELION's ``--relax_sym``): before its local search each
    particle's prior pose A moves to the symmetry-related pose A·R_k that fits the
    (lower-symmetry) reference best, and the centre of its Gaussian prior to the copy of the
    input pose nearest to that (:func:`relaxed_priors`).
    """

    n_classes: int = 1
    soft_classes: bool = False
    marginalize: bool = True
    significant_fraction: float = 0.999
    max_significant_poses: int = 300
    log_class_prior: tuple | None = None
    backprojection_max_shell: float | None = None
    cross_half_classes: bool = True
    random_class_seed: int | None = None
    alignment_folds: int = 1
    defocus_range_A: float = 0.0
    defocus_astigmatism: bool = False
    fit_beam_tilt: bool = False
    fit_magnification: bool = False
    relax_symmetry: str | None = None


@dataclass
class StepResult:
    """Per-particle results of one E-step (rows in the batch's order) and shell statistics.

    The pose is the most probable one of the particle's class; ``n_significant`` the poses it
    was backprojected at, ``max_posterior`` the largest weight, ``log_likelihood`` the
    log-evidence of the kept poses (:mod:`.posterior`), ``posterior_sd_deg`` the weighted RMS
    angle of the significant poses from the best (its angular accuracy); ``capped`` and
    ``pruning`` say where the search's caps, not its bound, decided
    (:class:`.pose_search.SearchResult`)."""

    rotation: np.ndarray  # (B, 3, 3)
    origin_px: np.ndarray  # (B, 2)
    error: np.ndarray  # (B,)
    n_evaluations: np.ndarray  # (B,)
    scale_estimate: np.ndarray  # (B,)
    noise_sums: np.ndarray  # (K, D//2 + 1): per class, posterior-weighted
    noise_counts: np.ndarray  # (K, D//2 + 1)
    class_id: np.ndarray | None = None  # (B,) most probable class, heterogeneous refinement
    class_weight: np.ndarray | None = None  # (B, K) posterior class probabilities
    n_significant: np.ndarray | None = None  # (B,)
    max_posterior: np.ndarray | None = None  # (B,)
    log_likelihood: np.ndarray | None = None  # (B,)
    posterior_sd_deg: np.ndarray | None = None  # (B,)
    capped: np.ndarray | None = None  # (B,) the cap dropped poses the bound kept (any class)
    pruning: np.ndarray | None = None  # (levels, 3) batch sums of SearchResult.pruning
    defocus_offset_A: np.ndarray | None = None  # (B, 2) best U, V change (CTF refinement)
    phase_sums: dict | None = None  # optics group → (D, H) complex phase evidence
    even_sums: dict | None = None  # optics group → {a, b, cc, cq, qq} (D, H) even evidence
    mag_sums: dict | None = None  # optics group → {axx, axy, ayy, bx, by} (D, H)


def class_posteriors(errors) -> np.ndarray:
    """Class probabilities ``(B, K)`` from the noise-weighted errors ``(B, K)`` at each class's
    best pose: the errors are −2 log-likelihoods, so ``p_k ∝ exp(−(E_k − min E) / 2)`` (equal
    class priors, RELION's maximum-a-posteriori weights)."""
    return softmax(-0.5 * np.asarray(errors, np.float64), axis=1)


@dataclass
class _Poses:
    """The significant poses of a batch, flattened: particle row, class, pose, weight."""

    particle: np.ndarray  # (P,) row in the half set's selection
    class_id: np.ndarray  # (P,)
    rotation: np.ndarray  # (P, 3, 3)
    origin_px: np.ndarray  # (P, 2)
    weight: np.ndarray  # (P,)


def random_classes(seed: int, particle_index, n_classes: int) -> np.ndarray:
    """A class drawn uniformly for each particle from ``seed`` and its index in the store."""
    return np.array([np.random.default_rng([seed, int(i)]).integers(n_classes)
                     for i in np.asarray(particle_index).ravel()], np.int64)


def _posteriors(found, options: EStepOptions, out: StepResult, rows: np.ndarray,
                class_offsets=None, cross_errors=None, drawn=None) -> _Poses:
    """Weigh every particle's candidates (``found[k].candidates``) and fill ``out[rows]``.

    ``class_offsets`` ``(K,)``: added to class k's errors so that they are −2 log-likelihoods
    comparable across classes with different noise models (:func:`.noise.log_noise_normaliser`);
    the reported ``error`` stays the noise-whitened error of the best pose. ``drawn`` ``(B,)``:
    a class for each particle (random subsets), replacing the class posterior.
    ``cross_errors[i][k]``: particle i's candidates of class k scored on the other half's
    reference; given, the class posterior comes from them and the poses within a class from
    the own half's errors: ``p(k, j) ∝ exp(ev_k) · exp(−E_kj/2) / Σ_j' exp(−E_kj'/2)``."""
    k_total = options.n_classes
    log_prior = (np.zeros(k_total) if options.log_class_prior is None
                 else np.asarray(options.log_class_prior, np.float64))
    offsets = np.zeros(k_total) if class_offsets is None else np.asarray(class_offsets, float)
    parts = {f: [] for f in ("particle", "class_id", "rotation", "origin_px", "weight")}
    for i, row in enumerate(rows):
        pools = [(rot, org, err + offsets[k])
                 for k, (rot, org, err) in enumerate(r.candidates[i] for r in found)]
        n_kept = [p[2].size if options.marginalize else 1 for p in pools]
        pools = [(rot[:m], org[:m], err[:m]) for (rot, org, err), m in zip(pools, n_kept)]
        own = class_evidence([p[2] for p in pools], log_prior)
        evidence = own if cross_errors is None else class_evidence(
            [cross_errors[i][k][:n_kept[k]] + offsets[k] for k in range(k_total)], log_prior)
        best_class = int(np.argmax(evidence)) if drawn is None else int(drawn[i])
        classes = range(k_total) if options.soft_classes and drawn is None else [best_class]
        # −2 log of the joint weight: the class's evidence, then the pose within the class
        errs = np.concatenate([pools[k][2] + 2.0 * (own[k] - log_prior[k] - evidence[k])
                               for k in classes])
        cls = np.concatenate([np.full(pools[k][2].size, k) for k in classes])
        keep, w, _ = significant_poses(errs, None, options.significant_fraction,
                                       options.max_significant_poses)
        top = float(own.max())
        log_ev = top + float(np.log(np.exp(own - top).sum()))  # own half's log-evidence
        rot = np.concatenate([pools[k][0] for k in classes])[keep]
        org = np.concatenate([pools[k][1] for k in classes])[keep]
        best_rot, best_org, best_err = (a[0] for a in pools[best_class])
        parts["particle"].append(np.full(keep.size, i))
        parts["class_id"].append(cls[keep])
        parts["rotation"].append(rot)
        parts["origin_px"].append(org)
        parts["weight"].append(w)
        out.rotation[row], out.origin_px[row] = best_rot, best_org
        out.error[row] = best_err - offsets[best_class]
        out.n_significant[row], out.max_posterior[row] = keep.size, w.max()
        out.log_likelihood[row] = log_ev
        same = cls[keep] == best_class  # (soft classes, capped: possibly none of them kept)
        d = angular_distance_deg(rot[same], best_rot[None])
        out.posterior_sd_deg[row] = (float(np.sqrt(np.sum(w[same] * d * d) / np.sum(w[same])))
                                     if same.any() else 0.0)
        if k_total > 1:
            out.class_id[row] = best_class
            out.class_weight[row] = (softmax(evidence) if drawn is None
                                     else np.eye(k_total)[best_class])
    poses = _Poses(*(np.concatenate(parts[f]) for f in ("particle", "class_id", "rotation",
                                                          "origin_px", "weight")))
    # one slice per (particle, class, rotation): its poses at several origins become adjacent
    key = np.concatenate([poses.particle[:, None], poses.class_id[:, None],
                          np.round(poses.rotation.reshape(-1, 9) * 1e6)], axis=1)
    _, rotation_group = np.unique(key, axis=0, return_inverse=True)
    order = np.lexsort((rotation_group.ravel(),))
    return _Poses(*(getattr(poses, f)[order] for f in ("particle", "class_id", "rotation",
                                                       "origin_px", "weight")))


def _blocks(poses: _Poses, rows: np.ndarray, size: int):
    """``rows`` (increasing indices into ``poses``) in blocks of about ``size`` that never split
    a particle's poses (a run of one particle's rotation stays in one block)."""
    start = 0
    while start < rows.size:
        stop = min(start + size, rows.size)
        while stop < rows.size and poses.particle[rows[stop]] == poses.particle[rows[stop - 1]]:
            stop += 1
        yield rows[start:stop]
        start = stop


def _search_sets(groups, slice_matrices):
    """``(group, rows, slice_matrix)`` for each set of particles that share a group and a slice
    matrix (``slice_matrices (N, 3, 3)``, or None when no particle has a magnification)."""
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if slice_matrices is None:
            yield g, rows, None
            continue
        keys, inverse = np.unique(np.round(slice_matrices[rows].reshape(-1, 9), 12), axis=0,
                                  return_inverse=True)
        for i, key in enumerate(keys):
            yield g, rows[inverse.ravel() == i], key.reshape(3, 3)


def _sliced_at(rotations, slice_matrix):
    """Poses' slicing matrices: ``slice_matrix @ A``, or the poses themselves."""
    return rotations if slice_matrix is None else np.matmul(slice_matrix, rotations)


def _ctf_evidence(out: StepResult, rows, x, ctf, scale, meta, references, class_weights,
                  slice_matrix, r_max: float, pixel_size_A: float, options: EStepOptions):
    """CTF refinement's per-particle defocus offsets and per-group phase sums for the batch
    ``rows`` at their best poses (:mod:`.ctf_refine`), written into ``out``."""
    xp = array_module(x)
    box = x.shape[-2]
    best = out.class_id[rows] if out.class_id is not None else np.zeros(rows.size, np.int64)
    for k in np.unique(best):
        mine = rows[best == k]
        mine_d = xp.asarray(mine)
        slices = extract_central_slices_rfft(references[k], _sliced_at(out.rotation[mine],
                                                                       slice_matrix), box)
        centred = translate_rfft(x[mine_d], out.origin_px[mine])
        optics = {c: np.asarray(v)[mine] for c, v in optics_meta(meta).items()}
        if options.defocus_range_A > 0:
            if out.defocus_offset_A is None:
                out.defocus_offset_A = np.zeros((out.rotation.shape[0], 2))
            out.defocus_offset_A[mine] = refine_defocus(
                centred, slices, optics, scale[mine], class_weights[k], pixel_size_A, r_max,
                options.defocus_range_A, astigmatism=options.defocus_astigmatism)
        if not (options.fit_beam_tilt or options.fit_magnification):
            continue
        scaled_ctf = xp.asarray(scale[mine]).reshape(-1, 1, 1) * ctf[mine_d]
        group = np.asarray(meta["optics_group"])[mine]
        for g in np.unique(group):
            at_host = np.flatnonzero(group == g)
            at = xp.asarray(at_host)
            if options.fit_beam_tilt:
                out.phase_sums = add_group_sums(out.phase_sums, int(g), phase_sums(
                    centred[at], scaled_ctf[at] * slices[at], class_weights[k]))
                out.even_sums = add_group_sums(out.even_sums, int(g), even_sums(
                    centred[at], slices[at], {c: v[at_host] for c, v in optics.items()},
                    scale[mine][at_host], class_weights[k], pixel_size_A))
            if options.fit_magnification:
                out.mag_sums = add_group_sums(out.mag_sums, int(g), magnification_sums(
                    centred[at], slices[at], scaled_ctf[at], class_weights[k]))


def relaxed_priors(reference, data: ParticleData, rotations, origins_px, centre,
                   r_align: float, symmetry: str):
    """Symmetry relaxation's starting poses: for each particle the rotation ``A·R_k`` (R_k in
    ``symmetry``, identity included) with the smallest error against ``reference`` at its
    origin, and the Gaussian prior's centre (if any) moved to the copy ``A₀·R_j`` of its input
    pose nearest to that. Returns ``(rotations (B, 3, 3), centre)``."""
    operators = symmetry_operators(symmetry)
    out = np.array(rotations, np.float64)
    new_centre = None if centre is None else (np.array(centre[0], np.float64), centre[1])
    for b in range(out.shape[0]):
        copies = np.matmul(out[b], operators)
        errors = pose_errors(reference, data, b, copies,
                             np.repeat(np.asarray(origins_px)[b][None], len(operators), axis=0),
                             r_align)
        out[b] = copies[int(np.argmin(errors))]
        if new_centre is not None:
            centres = np.matmul(new_centre[0][b], operators)
            new_centre[0][b] = centres[int(np.argmin(angular_distance_deg(centres, out[b])))]
    return out, new_centre


def add_group_sums(by_group: dict | None, group: int, sums) -> dict:
    """``by_group`` (None: new) with ``sums`` (an array or a dict of arrays) added to its
    ``group``'s: per-optics-group evidence, summed over particles and batches."""
    by_group = {} if by_group is None else by_group
    old = by_group.get(group)
    by_group[group] = (sums if old is None else
                       {k: old[k] + v for k, v in sums.items()} if isinstance(sums, dict)
                       else old + sums)
    return by_group


def refine_particles(sums: FourierSums, images, meta: dict, groups, references, envelopes,
                     noise_weight, params: SearchParams, pixel_size_A: float,
                     scale_max_shell: float, first_index: int = 0,
                     options: EStepOptions = EStepOptions()) -> StepResult:
    """Search, weigh, score and backproject a batch; ``sums`` is accumulated in place.

    ``meta``: CTF columns, ``scale (B,)`` (current scales, used for search and backprojection),
    ``origin_px (B, 2)`` (prior origins), and for local search ``rotation (B, 3, 3)`` (priors);
    with ``prior_centre_rotation (B, 3, 3)`` and ``prior_centre_origin_px (B, 2)`` the
    Gaussian priors of ``params`` are centred there (local refinement, :func:`.pose_search.prior_penalty`).
    ``groups`` ``(B,)``: the half set of each particle (``half · F + fold`` with
    ``options.alignment_folds`` F > 1); references, envelopes and sums are indexed
    ``class · 2 + half`` (``(class · 2 + half) · F + fold``; the other half's reference of the
    same fold judges classes across halves). With ``options.n_classes`` > 1 every particle is
    searched against every class (:class:`EStepOptions` says how classes and poses are
    weighed).
    ``noise_weight``: ``1/σ²`` on the rfft grid, ``(D, H)`` shared by all classes or
    ``(K, D, H)`` one noise model per class; with per-class models the class posteriors
    include each model's normaliser (:func:`.noise.log_noise_normaliser`) and the noise sums
    are kept per class, each particle's residuals weighed by its class posterior.

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
    x = observed_rfft(images, meta, pixel_size_A)
    ctf = particle_ctfs(meta, box, pixel_size_A, xp)
    noise_weight = xp.asarray(noise_weight)
    class_weights = (list(noise_weight) if noise_weight.ndim == 3
                     else [noise_weight] * options.n_classes)
    if len(class_weights) != options.n_classes:
        raise ValueError(f"{len(class_weights)} noise models for {options.n_classes} classes")
    scale = np.asarray(meta["scale"], np.float64)
    prior_origin = np.asarray(meta["origin_px"], np.float64)
    prior_rot = meta.get("rotation")
    groups = np.asarray(groups)
    k_total = options.n_classes
    out = StepResult(np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros(n),
                     np.zeros(n, np.int64), np.ones(n), np.zeros((k_total, box // 2 + 1)),
                     np.zeros((k_total, box // 2 + 1)), n_significant=np.zeros(n, np.int64),
                     max_posterior=np.zeros(n), log_likelihood=np.zeros(n),
                     posterior_sd_deg=np.zeros(n), capped=np.zeros(n, bool))
    if k_total > 1:
        out.class_id = np.zeros(n, np.int64)
        out.class_weight = np.zeros((n, k_total))
    # per pose in a block: shifted image, model, CTF weight, products (complex64/float32)
    per_pose = 6 * 8 * box * (box // 2 + 1)
    block = batch_size_for_memory(per_pose, free_device_bytes(xp),
                                  max(16, min(1024, (64 << 20) // per_pose)), minimum=16)
    offsets = None
    if noise_weight.ndim == 3 and k_total > 1:
        sel_band, _, _, mult = band_pixels(box, 0.0, params.r_align)
        offsets = [log_noise_normaliser(w, (sel_band, mult)) for w in class_weights]
    folds = max(1, int(options.alignment_folds))
    # particles are searched in sets that share a group and a magnification (slice matrix)
    slice_matrices = (magnified_rotations(np.tile(np.eye(3), (n, 1, 1)), meta)
                      if "mag_matrix" in meta else None)
    for g, sel_host, slice_matrix in _search_sets(groups, slice_matrices):
        h, f = divmod(int(g), folds)
        # class k's reference and sums for this half and fold, and the other half's reference
        own_group = [(2 * k + h) * folds + f for k in range(k_total)]
        other_group = [(2 * k + 1 - h) * folds + f for k in range(k_total)]
        sel = xp.asarray(sel_host)
        data = [ParticleData(x[sel], ctf[sel], scale[sel_host], class_weights[k], slice_matrix)
                for k in range(k_total)]  # each class under its own noise model
        centre = (None if "prior_centre_rotation" not in meta else
                  (np.asarray(meta["prior_centre_rotation"])[sel_host],
                   np.asarray(meta["prior_centre_origin_px"])[sel_host]))
        start = None if prior_rot is None else np.asarray(prior_rot)[sel_host]
        if options.relax_symmetry and params.local and start is not None:
            start, centre = relaxed_priors(references[own_group[0]], data[0], start,
                                           prior_origin[sel_host], centre, params.r_align,
                                           options.relax_symmetry)
        found = [branch_and_bound(references[own_group[k]], data[k], params,
                                  prior_rotation=start,
                                  prior_origin_px=prior_origin[sel],
                                  envelope=envelopes[own_group[k]], prior_centre=centre)
                 for k in range(k_total)]
        out.n_evaluations[sel_host] = sum(r.n_evaluations for r in found)
        out.capped[sel_host] = np.any([r.pruning[:, :, 2].sum(axis=1) > 0 for r in found], axis=0)
        pruned = sum(r.pruning.sum(axis=0) for r in found)
        out.pruning = pruned if out.pruning is None else out.pruning + pruned
        cross = None
        if options.cross_half_classes and k_total > 1 and options.random_class_seed is None:
            cross = [[pose_errors(references[other_group[k]], data[k], i,
                                  *found[k].candidates[i][:2], params.r_align)
                      for k in range(k_total)] for i in range(sel_host.size)]
        drawn = (None if options.random_class_seed is None or k_total == 1 else
                 random_classes(options.random_class_seed, first_index + sel_host, k_total))
        poses = _posteriors(found, options, out, sel_host, offsets, cross, drawn)
        if options.defocus_range_A > 0 or options.fit_beam_tilt or options.fit_magnification:
            _ctf_evidence(out, sel_host, x, ctf, scale, meta, [references[g] for g in own_group],
                          class_weights, slice_matrix, params.r_align, pixel_size_A, options)
        num, den = np.zeros(sel_host.size), np.zeros(sel_host.size)
        x_h, ctf_h, s_h = x[sel], ctf[sel], scale[sel_host]
        for k in range(k_total):
            mine = np.flatnonzero(poses.class_id == k)
            members = np.unique(poses.particle[mine])
            sums.count[own_group[k]] += members.size
            for j in _blocks(poses, mine, block):
                pid, pid_d = poses.particle[j], xp.asarray(poses.particle[j])
                # runs of poses that share a particle and a rotation: one slice, one insertion
                new_run = np.r_[True, (np.diff(pid) != 0)
                                | np.any(np.diff(poses.rotation[j], axis=0) != 0, axis=(1, 2))]
                starts = np.flatnonzero(new_run)
                run_of = np.cumsum(new_run) - 1
                centred = translate_rfft(x_h[pid_d], poses.origin_px[j])
                slicing = _sliced_at(poses.rotation[j][starts], slice_matrix)
                model = (ctf_h[pid_d] * extract_central_slices_rfft(
                    references[own_group[k]], slicing, box)[xp.asarray(run_of)])
                w = poses.weight[j]
                t_num, t_den = scale_terms(centred, model, class_weights[k], scale_max_shell)
                np.add.at(num, pid, w * t_num)
                np.add.at(den, pid, w * t_den)
                s = xp.asarray(s_h[pid]).reshape(-1, 1, 1)
                p_sum, p_count = shell_power_sums(centred - s * model, weights=w)
                out.noise_sums[k] += p_sum
                out.noise_counts[k] += p_count
                w_d = xp.asarray(w.astype(np.float32)).reshape(-1, 1, 1)
                data_runs = segment_sums(centred * w_d, starts)
                w_runs = xp.asarray(np.add.reduceat(w, starts).astype(np.float32)).reshape(-1, 1, 1)
                sc = (xp.asarray(s_h[pid[starts]]).reshape(-1, 1, 1)
                      * ctf_h[xp.asarray(pid[starts])]).astype(xp.float32)
                insert_central_slices_rfft((data_runs * sc).astype(xp.complex64), sc * sc * w_runs,
                                           slicing, sums.data[own_group[k]],
                                           sums.weight[own_group[k]],
                                           r_max=options.backprojection_max_shell)
        out.scale_estimate[sel_host] = scale_from_terms(num, den)
    return out
