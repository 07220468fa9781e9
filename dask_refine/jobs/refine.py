"""Homogeneous Refinement: gold-standard EM over poses, shifts and per-particle scales.

Per iteration (docs/design.md §3): broadcast both half references once; map branch-and-bound pose
search + marginalised backprojection over the chunks and tree-reduce the sums per half; reconstruct
the half maps, their FSC and resolution; regularise each half by the SSNR its FSC implies (the
next references); update the noise model and the scales; align the next iteration up to the
resolution plus a margin. Stops when resolution, pose changes (and class changes) have stalled
for ``patience`` iterations (RELION auto-refine's rule, :class:`RefineConfig`), or after
``max_iterations``. The output folder is the checkpoint (:mod:`.checkpoint`).

Outputs at the top of ``out_dir``: ``map.mrc`` (FSC-Wiener-regularised full map), ``half_A.mrc``,
``half_B.mrc``, ``fsc.csv``, ``fsc.png``, ``orientations.png``, ``slices.png``, ``guinier.png``
(B-factor in ``summary.json``), ``iterations.csv``, ``particles.star`` (RELION 3.1),
``summary.json``, ``config.json``; each iteration's files under ``iterations/iter_NNN/``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..core.backprojection import CTF_PARAMETERS, FourierSums, particle_ctfs
from ..core.filters import lowpass_filter
from ..core.fourier import centred_rfftn, translate_volume
from ..core.fsc import (fsc, mask_corrected_fsc, resolution_at_threshold, shell_resolution_A,
                        ssnr_from_fsc, within_band)
from ..core.masks import soft_sphere_mask
from ..core.noise import (background_noise_power, class_noise_models, initial_noise_and_scale,
                          noise_weights, renormalise_scales, shell_mean)
from ..core.nonuniform import apply_local_filter, local_cutoff_choice, local_resolution_map
from ..core import so3_grid
from ..core.pose_search import (SearchParams, amplitude_envelope, exhaustive_evaluations,
                                search_levels)
from ..core.backend import fft_workers
from ..core.refine_step import EStepOptions, add_group_sums
from ..core.projection import prepare_reference_rfft
from ..core.reconstruction import fold_out_references, reconstruct
from ..core.rotations import angular_distance_deg
from ..io.cryosparc import export_cs
from ..io.errors import InputError
from ..io.figures import write_job_figures
from ..io.mrc import read_map, write_map
from ..io.outputs import write_csv, write_json
from ..io.star import POSTERIOR_FIELDS, export_star, has_image_files
from ..io.store import ParticleStore
from ..parallel.cluster import dask_client, refinement_work_s
from ..parallel.events import publish
from ..parallel.mapreduce import refine_graph
from .ctf_refinement import (
    CTF_STATE,
    image_model,
    load_optics,
    refine_from_evidence,
    refined_columns,
)
from .progress import final_results, iteration_event, new_run_id
from .config import RefineConfig
from .masking import (
    final_mask,
    read_user_mask,
    refinement_mask,
    write_fsc_report,
)
from .postprocess import start_postprocess, write_postprocessed
from .reconstruct import check_symmetry
from .checkpoint import (ITERATIONS, IterationWriter, RunLock, check_resumable,
                         completed_iterations, fetch_checkpoint, iteration_dir, output_dir,
                         publish_iteration, read_state)

HALVES = ("A", "B")
RESUME_KEYS = ("store", "initial_map", "n_classes", "soft_classes", "cross_half_classes",
               "per_class_noise", "non_uniform",
               "initial_lowpass_A",
               "mask_diameter_A", "max_shift_A",
               "shift_step_px", "first_level", "max_level", "max_global_level",
               "first_level_candidates", "local_search",
               "min_global_iterations", "max_far_jump_fraction", "marginalize", "use_ctf", "pad",
               "alignment_margin_shells", "band_limited_reconstruction", "symmetry",
               "alignment_folds", "per_particle_defocus", "per_particle_astigmatism",
               "defocus_range_A", "per_group_ctf", "higher_order_aberrations_from_A",
               "ctf_refine_from_A", "dynamic_mask", "local_refinement", "prior_sigma_deg",
               "prior_sigma_shift_A", "focus_mask", "fulcrum_A", "relax_symmetry")
#: The fold-out references of an iteration, in its folder (``(2K·F, D, D, D)`` float32).
ALIGNMENT_REFERENCES = "alignment_references.npy"
#: Folds per half set when ``alignment_folds`` is automatic, and the memory their sums may take
#: per accumulation chain (:func:`resolved_alignment_folds`).
DEFAULT_ALIGNMENT_FOLDS = 4
FOLD_SUMS_BUDGET = 2 << 30
#: What a checkpoint written before a resume key existed ran with.
LEGACY_SETTINGS = {"alignment_folds": 1, "per_particle_defocus": False,
                   "per_particle_astigmatism": False, "defocus_range_A": 2000.0,
                   "per_group_ctf": False, "ctf_refine_from_A": 8.0,
                   "higher_order_aberrations_from_A": 4.0, "dynamic_mask": None,
                   "local_refinement": False, "prior_sigma_deg": 5.0,
                   "prior_sigma_shift_A": 3.0, "focus_mask": None, "fulcrum_A": None,
                   "relax_symmetry": None}
#: Per-iteration figures of the E-step's posteriors and of outliers, in iterations.csv.
ITERATION_STATISTICS = ("far_jump_fraction", "median_significant_poses", "mean_max_posterior",
                        "angular_accuracy_deg", "outlier_fraction", "scale_iqr",
                        "pruned_by_bound_fraction", "pruned_by_cap_fraction", "capped_fraction",
                        "mean_defocus_change_A")
#: Poses whose error is within this of the best (posterior weight ≥ 10⁻⁴ of the best's) are
#: the candidates the E-step weighs: −2 log 10⁻⁴.
POSTERIOR_WINDOW = float(2.0 * np.log(1e4))
#: A local search covers ± this many times the particles' current angular accuracy (the
#: median posterior spread), as RELION's local searches cover ±3σ of their prior.
LOCAL_RANGE_SIGMAS = 3.0
#: Local searches go no finer than the first level whose spacing is below this fraction of the
#: angular accuracy (RELION auto-refine's 0.75, :func:`fine_enough_level`).
FINE_ENOUGH = 0.75


@dataclass
class State:
    """What one iteration hands to the next (all of it is saved in the iteration folder)."""

    iteration: int
    references: list  # (D, D, D) float32 references, index class · 2 + half
    sigma2: np.ndarray  # (K, S) noise σ² per class and shell
    scale: np.ndarray  # (N,)
    rotation: np.ndarray | None  # (N, 3, 3) or None before the first iteration
    origin_px: np.ndarray  # (N, 2)
    r_align: float
    resolution_A: float
    best_resolution_A: float
    stale: int  # iterations without improvement
    class_id: np.ndarray | None = None  # (N,) best class (heterogeneous refinement)
    local: bool = False  # this iteration searched locally (once local, local from then on)
    level: int = 0  # the finest grid level of this iteration's search
    pose_change_deg: float = 180.0  # median pose change of this iteration
    # the angular sampling that change is measured against: the coarser of the two grids
    pose_change_sampling_deg: float = 60.0
    best_pose_change_deg: float = 180.0  # smallest median pose change so far
    angular_accuracy_deg: float = 180.0  # median posterior spread of the poses
    # share of the particles whose pose moved farther than a local search reaches
    far_jump_fraction: float = 1.0
    class_fraction: np.ndarray | None = None  # (K,) mean class posterior (the next priors)
    # (2K·F) references each particle is searched against, index (class · 2 + half) · F + fold:
    # its half's map without its fold (None: the half maps themselves)
    alignment_references: list | None = None
    # CTF refinement (ctf_refinement.CTF_STATE): each particle's defocus offset from its file's
    # (N, 2: U, V), the beam tilt (G, 2) mrad of each optics group (in the order of
    # np.unique(optics_group)); None: as filed
    defocus_offset_A: np.ndarray | None = None
    beam_tilt_mrad: np.ndarray | None = None
    # (G, 2) added to the groups' odd coefficients 2 and 5, (G, 9) to their even ones
    trefoil: np.ndarray | None = None
    even_zernike: np.ndarray | None = None
    mag_matrix: np.ndarray | None = None  # (G, 2, 2) refined magnification of each group

    @property
    def n_classes(self) -> int:
        return len(self.references) // 2


def initial_maps(config: RefineConfig) -> list[str]:
    """The initial map of each class (one for Homogeneous Refinement; ``n_classes`` copies of
    a single map)."""
    maps = ([str(config.initial_map)] if isinstance(config.initial_map, (str, Path))
            else [str(m) for m in config.initial_map])
    return maps * config.n_classes if config.n_classes and len(maps) == 1 else maps


def _random_start(config: RefineConfig) -> bool:
    """K classes from one map: the first iteration draws random subsets."""
    single = isinstance(config.initial_map, (str, Path)) or len(config.initial_map) == 1
    return bool(single and config.n_classes and config.n_classes > 1)


def _check_inputs(config: RefineConfig, store: ParticleStore):
    info = store.info
    volumes = []
    for path in initial_maps(config):
        volume, px = read_map(path)
        if volume.shape[0] != info.box_size:
            raise InputError(path, f"box {volume.shape[0]} differs from the particles' "
                             f"box {info.box_size}; resample the map to the particle box")
        if abs(px - info.pixel_size_A) > 0.01 * info.pixel_size_A:
            raise InputError(path, f"voxel size {px:.4g} Å differs from the particles' "
                             f"pixel size {info.pixel_size_A:.4g} Å")
        volumes.append(volume)
    check_symmetry(config.symmetry)
    if config.relax_symmetry:
        check_symmetry(config.relax_symmetry)
    for path in (config.masks.mask_path, config.focus_mask):
        if path:
            read_user_mask(path, info.box_size, info.pixel_size_A)
    if config.local_refinement:
        input_poses(store)  # the poses it starts from
    names = ["half_set"] + (list(CTF_PARAMETERS) if config.use_ctf else [])
    for name in names:
        if not store.has_column(name):
            raise InputError(f"{store.path}/{name}", "required column is missing")
    return volumes


def resolved_alignment_folds(config: RefineConfig, box_size: int, n_classes: int) -> int:
    """``config.alignment_folds``, or when it is None the most folds, up to
    ``DEFAULT_ALIGNMENT_FOLDS``, whose sums fit ``FOLD_SUMS_BUDGET`` per accumulation chain: an
    E-step chain holds 2 · K · F padded Fourier sums (12 bytes a voxel), 13 MB each at box 64
    but 0.8 GB at box 256, where F = 1 keeps a run's memory what it was."""
    if config.alignment_folds is not None:
        return int(config.alignment_folds)
    p = config.pad * box_size
    per_group = 12 * p * p * (p // 2 + 1)
    folds = DEFAULT_ALIGNMENT_FOLDS
    while folds > 1 and 2 * n_classes * folds * per_group > FOLD_SUMS_BUDGET:
        folds -= 1
    return folds


def alignment_folds(half_set, folds: int) -> np.ndarray:
    """Each particle's fold within its half set: the half's particles, in store order, cut into
    ``folds`` runs of equal size (a chunk of the store then mostly holds one fold, and the
    folds do not depend on how many halves' particles come first). Fold f of a half is left
    out of the reference its particles are aligned against."""
    half_set = np.asarray(half_set)
    fold = np.zeros(half_set.size, np.int64)
    for h in np.unique(half_set):
        rows = np.flatnonzero(half_set == h)
        fold[rows] = np.arange(rows.size) * folds // rows.size
    return fold


def _particle_mask(config: RefineConfig, box: int, px: float) -> np.ndarray:
    """The soft spherical mask of ``mask_diameter_A`` used for references and FSCs."""
    radius_px, _ = _geometry(config, box, px)
    return soft_sphere_mask(box, radius_px, soft_edge_px=max(3.0, 0.05 * box))


def _geometry(config: RefineConfig, box: int, px: float):
    mask_diameter_A = config.mask_diameter_A or 0.8 * box * px
    radius_px = 0.5 * mask_diameter_A / px
    max_shift_px = (config.max_shift_A / px) if config.max_shift_A is not None else 0.1 * box
    return radius_px, max_shift_px


def _initial_state(config, store, volumes, meta, radius_px, sample: int = 512) -> State:
    info = store.info
    box, px = info.box_size, info.pixel_size_A
    n = info.n_particles
    mask = _particle_mask(config, box, px)
    # greyscale and first noise model from a sample of particles (every k-th particle)
    rows = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(int))
    images = np.asarray(store.images.get_orthogonal_selection((rows, slice(None), slice(None))))
    power = shell_mean((np.abs(centred_rfftn(images, 2)) ** 2).mean(axis=0), box, 2)
    # the first noise model from the images' background (coloured noise is not signal)
    noise_power = background_noise_power(images, radius_px, soft_edge_px=max(3.0, 0.05 * box))
    ctf2 = (particle_ctfs({k: v[rows] for k, v in image_model(meta, px).items()}, box, px)
            ** 2).mean(axis=0) if config.use_ctf else np.ones((box, box // 2 + 1))
    lowpass_shell = box * px / config.initial_lowpass_A
    references, noise = [], []
    for volume in volumes:  # each class on the particles' greyscale, separately
        initial = lowpass_filter(volume, config.initial_lowpass_A, px) * mask.astype(np.float32)
        ref_power = shell_mean(np.abs(centred_rfftn(initial.astype(np.float64), 3)) ** 2, box, 3)
        g, sigma2 = initial_noise_and_scale(power, shell_mean(ctf2, box, 2), ref_power,
                                            lowpass_shell, noise_power)
        reference = (initial * g).astype(np.float32)
        references += [reference, reference.copy()]
        noise.append(sigma2)
    r_align = min(box / 2 - 1, lowpass_shell + config.alignment_margin_shells)
    noise = np.stack(noise) if config.per_class_noise else np.broadcast_to(
        np.mean(noise, axis=0), (len(noise), len(noise[0]))).copy()
    state = State(0, references, noise, np.ones(n), None, np.zeros((n, 2)),
                  r_align, config.initial_lowpass_A, math.inf, 0)
    if config.local_refinement:  # from the store's poses, locally, the prior's width known
        rotation, origin_px = input_poses(store, fulcrum_px(config, box, px))
        state = replace(state, rotation=rotation, origin_px=origin_px, local=True,
                        angular_accuracy_deg=config.prior_sigma_deg)
    return state


def fulcrum_px(config: RefineConfig, box: int, px: float) -> np.ndarray | None:
    """A local refinement's centre of rotation, (x, y, z) pixels from the box centre: the
    given ``fulcrum_A``, else the focus mask's centre of mass; None: the box centre."""
    if not config.local_refinement:
        return None
    if config.fulcrum_A is not None:
        return np.asarray(config.fulcrum_A, np.float64) / px
    if config.focus_mask:
        mask = read_user_mask(config.focus_mask, box, px).astype(np.float64)
        z, y, x = (np.indices(mask.shape) - box // 2).astype(np.float64)
        return np.array([(c * mask).sum() for c in (x, y, z)]) / mask.sum()
    return None


def fulcrum_shift_px(rotation, fulcrum) -> np.ndarray:
    """``(N, 2)``: how far the fulcrum's projection lies from the box centre in each particle's
    image, ``(A c)_xy``. Against the map moved so that the fulcrum sits at the centre
    (V'(r) = V(r + c)), a particle's origin is its origin against V less this (the slice of V'
    at A is the slice of V times e^{2πi k·(Ac)/D}, docs/design.md §3)."""
    if fulcrum is None:
        return np.zeros((len(rotation), 2))
    return np.einsum("nij,j->ni", np.asarray(rotation, np.float64), fulcrum)[:, :2]


def input_poses(store, fulcrum=None) -> tuple[np.ndarray, np.ndarray]:
    """The store's poses, ``rotation (N, 3, 3)`` and origins in each particle's pixels (against
    the map moved to the ``fulcrum``, :func:`fulcrum_shift_px`), for a local refinement (an
    error names what is missing)."""
    missing = [c for c in ("rotation", "shift_A") if not store.has_column(c)]
    if missing:
        raise InputError(store.path, f"no {', '.join(missing)} column(s); local refinement "
                         "starts from the particles' poses (import a STAR or .cs with angles and "
                         "origins, or a previous job's particles.star)")
    shift_A = store.read_column("shift_A")
    image_px = store.image_pixel_sizes()
    rotation = store.read_column("rotation")
    return rotation, shift_A / image_px[:, None] - fulcrum_shift_px(rotation, fulcrum)


def _search_params(config, state: State, box: int, radius_px: float, max_shift_px: float):
    """This iteration's search, chosen by the state of the poses (RELION auto-refine's way):
    the finest level the alignment band asks for (at most ``max_global_level`` while global,
    as RELION's ``--auto_local_healpix_order``); local once the last iteration's median pose
    change fell below the angular sampling it was measured at (the coarser of the two grids:
    the poses then stay within a cell of where they were found) *and* at most
    ``max_far_jump_fraction`` of the particles moved farther than a local search reaches
    (:func:`far_jump_reach_deg`) with a posterior sharper than half that reach: the median
    speaks for the majority, and a minority still moving decisively is what a local search
    would freeze (the realistic benchmark case: median change 3.3° at iteration 3 while 6.3% of
    the particles made such jumps, 62% of them onto the truth; particles with broad posteriors,
    junk among them, jump at random and are not counted); a local range of
    ±``LOCAL_RANGE_SIGMAS`` × the angular accuracy (a local search covers ±1.5 cells of its
    starting level)."""
    target = box / (np.pi * max(radius_px, 1.0) * max(state.r_align, 1.0))  # radians
    last = int(np.ceil(np.log2(np.deg2rad(60.0) / target)))
    last = int(np.clip(last, config.first_level, config.max_level))
    local = bool(config.local_search and state.rotation is not None and (
        state.local or (state.iteration >= config.min_global_iterations
                        and state.pose_change_deg < state.pose_change_sampling_deg
                        and state.far_jump_fraction <= config.max_far_jump_fraction)))
    if config.local_search and not local:  # as RELION's auto_local_healpix_order: finer
        # grids are searched locally (--global-only searches every level globally)
        last = min(last, max(config.max_global_level, config.first_level))
    if local:  # and no finer than the poses are known (RELION's updateAngularSampling)
        last = min(last, max(config.first_level,
                             fine_enough_level(state.angular_accuracy_deg, config.max_level)))
    first = min(config.first_level, last)
    # the coarsest level whose ±1.5 cells still cover ±3σ: spacing(l) ≥ 2σ (σ/1.5 · 3)
    wide = 2.0 * LOCAL_RANGE_SIGMAS / 3.0 * max(state.angular_accuracy_deg, 1e-3)
    local_level = int(np.clip(np.floor(np.log2(60.0 / wide)), first, max(first, last - 1)))
    # finest shift step: a shift error of half a step costs ≤ ½ rad of phase at r_align
    shift_step = min(config.shift_step_px, box / (2 * np.pi * max(state.r_align, 1.0)))
    return SearchParams(r_align=state.r_align, particle_radius_px=radius_px,
                        first_level=first, last_level=last,
                        max_shift_px=max_shift_px, shift_step_px=shift_step,
                        first_level_candidates=config.first_level_candidates,
                        local=local, local_level=local_level, symmetry=config.symmetry,
                        posterior_window=POSTERIOR_WINDOW if config.marginalize else 0.0)


def fine_enough_level(angular_accuracy_deg: float, max_level: int) -> int:
    """The coarsest grid level whose spacing is below ``FINE_ENOUGH`` × the particles'
    angular accuracy (the median posterior spread): RELION's auto-refine makes its sampling
    finer only while the step is at least 0.75 × the estimated accuracy. A finer grid adds
    poses inside the posterior, not information, and once the posterior holds more grid poses
    than the search keeps (its final candidates, the E-step's significant poses) it is cut:
    the reconstruction then sees a posterior narrower than the particle's. At most
    ``max_level``: best poses only (no marginalisation) have no spread to go by."""
    level = 0
    while level < max_level and so3_grid.spacing_deg(level) >= FINE_ENOUGH * angular_accuracy_deg:
        level += 1
    return level


def far_jump_reach_deg(angular_accuracy_deg: float, level: int) -> float:
    """How far (°) a local search started from a pose can move it: ±``LOCAL_RANGE_SIGMAS`` ×
    the angular accuracy, and at least ±1.5 cells of the grid ``level`` it was searched at
    (:func:`_search_params`)."""
    return max(LOCAL_RANGE_SIGMAS * angular_accuracy_deg, 1.5 * so3_grid.spacing_deg(level))


def _estep_options(config, state: State) -> EStepOptions:
    """How this iteration's E-step weighs poses and classes (class priors: the last
    iteration's class fractions, floored at 0.1% so that no class is shut out for good)."""
    prior = (None if state.class_fraction is None
             else tuple(np.log(np.maximum(state.class_fraction, 1e-3)).tolist()))
    # CTF refinement from the first iteration that starts at ctf_refine_from_A or better
    refine_ctf = (config.use_ctf and state.iteration > 0
                  and state.resolution_A <= config.ctf_refine_from_A)
    return EStepOptions(n_classes=state.n_classes,
                        soft_classes=config.soft_classes and state.n_classes > 1,
                        marginalize=config.marginalize, log_class_prior=prior,
                        cross_half_classes=config.cross_half_classes,
                        random_class_seed=(config.random_seed if state.iteration == 0
                                           and _random_start(config) else None),
                        backprojection_max_shell=(state.r_align if config.band_limited_reconstruction
                                                  else None),
                        alignment_folds=config.alignment_folds,
                        defocus_range_A=(config.defocus_range_A if config.per_particle_defocus
                                         and refine_ctf else 0.0),
                        defocus_astigmatism=config.per_particle_astigmatism,
                        fit_beam_tilt=config.per_group_ctf and refine_ctf,
                        fit_magnification=config.per_group_ctf and refine_ctf,
                        relax_symmetry=config.relax_symmetry)


def outlier_fraction(log_likelihood) -> float:
    """Fraction of particles whose log-likelihood lies more than 3 robust standard deviations
    (1.4826 · MAD) below the median: junk and badly fitting particles."""
    ll = np.asarray(log_likelihood, np.float64)
    med = np.median(ll)
    mad = 1.4826 * np.median(np.abs(ll - med))
    return float(np.mean(ll < med - 3.0 * mad)) if mad > 0 else 0.0


def _class_dir(folder: Path, k: int, n_classes: int) -> Path:
    """Where class ``k``'s files go: the folder itself for one class, else ``class_NNN/``."""
    if n_classes == 1:
        return folder
    sub = folder / f"class_{k + 1:03d}"
    sub.mkdir(exist_ok=True)
    return sub


def _save_state(folder: Path, state: State, per_class, px: float, extra: dict):
    """``per_class``: ``(halves, curve, full_map, solvent_mask or None)`` of each class (None
    for an empty class)."""
    for k, result in enumerate(per_class):
        where = _class_dir(folder, k, state.n_classes)
        for h, name in enumerate(HALVES):
            write_map(where / f"reference_{name}.mrc", state.references[2 * k + h], px)
        if result is None:
            continue
        halves, curve, full_map, solvent = result
        for h, name in enumerate(HALVES):
            write_map(where / f"half_{name}.mrc", halves[h], px)
        write_map(where / "map.mrc", full_map, px)
        if solvent is not None:  # the mask the references and the FSC used
            write_map(where / "mask.mrc", np.asarray(solvent, np.float32), px)
        box = full_map.shape[0]
        shells = np.arange(curve.size)
        write_csv(where / "fsc.csv", {"shell": shells.tolist(),
                                      "frequency_invA": (shells / (box * px)).tolist(),
                                      "resolution_A": shell_resolution_A(box, px).tolist(),
                                      "fsc": curve.tolist()})
    classes = {} if state.class_id is None else {"class_id": state.class_id,
                                                 "class_fraction": state.class_fraction}
    if state.alignment_references is not None:  # what the next iteration aligns against
        np.save(folder / ALIGNMENT_REFERENCES, np.stack(state.alignment_references))
    for name in CTF_STATE:
        if getattr(state, name) is not None:
            classes[name] = getattr(state, name)
    np.savez(folder / "poses.npz", rotation=state.rotation, origin_px=state.origin_px,
             scale=state.scale,  # σ² per shell; (K, shells) with several classes
             sigma2=state.sigma2[0] if state.n_classes == 1 else state.sigma2,
             **classes, **extra.pop("arrays"))
    write_json(folder / "state.json", {
        "iteration": state.iteration, "r_align": state.r_align,
        "resolution_A": state.resolution_A, "best_resolution_A": state.best_resolution_A,
        "stale": state.stale, "n_classes": state.n_classes, "local": state.local,
        "level": state.level, "pose_change_deg": state.pose_change_deg,
        "best_pose_change_deg": state.best_pose_change_deg,
        "angular_accuracy_deg": state.angular_accuracy_deg,
        "far_jump_fraction": state.far_jump_fraction,
        "pose_change_sampling_deg": state.pose_change_sampling_deg, **extra})


def _load_state(out_dir, iteration: int) -> State:
    folder = iteration_dir(out_dir, iteration)
    js = read_state(out_dir, iteration)
    arrays = np.load(folder / "poses.npz")
    k_total = int(js.get("n_classes", 1))
    refs = [read_map(_class_dir(folder, k, k_total) / f"reference_{h}.mrc")[0]
            for k in range(k_total) for h in HALVES]
    sigma2 = np.atleast_2d(arrays["sigma2"])  # one row per class (older runs: one shared)
    aligned = folder / ALIGNMENT_REFERENCES
    aligned = list(np.load(aligned)) if aligned.exists() else None
    sigma2 = np.broadcast_to(sigma2, (k_total, sigma2.shape[-1])).copy()
    return State(js["iteration"], refs, sigma2, arrays["scale"], arrays["rotation"],
                 arrays["origin_px"], js["r_align"], js["resolution_A"],
                 js["best_resolution_A"], js["stale"],
                 arrays["class_id"] if "class_id" in arrays else None,
                 class_fraction=arrays["class_fraction"] if "class_fraction" in arrays else None,
                 far_jump_fraction=js.get("far_jump_fraction", 0.0),  # older checkpoints
                 alignment_references=aligned,
                 **{name: arrays.get(name) for name in CTF_STATE},
                 **{k: js[k] for k in ("local", "level", "pose_change_deg",
                                       "pose_change_sampling_deg", "best_pose_change_deg",
                                       "angular_accuracy_deg")})


def _summed_by_group(per_step) -> dict:
    """Per-optics-group evidence (group → array or dict of arrays, or None) summed over the
    E-step's batches."""
    total = {}
    for sums in per_step:
        for g, value in (sums or {}).items():
            total = add_group_sums(total, g, value)
    return total


def _run_iteration(config, store, meta, groups, state: State, client, radius_px, max_shift_px,
                   mask, progress):
    info = store.info
    box, px = info.box_size, info.pixel_size_A
    n_classes = state.n_classes
    params = _search_params(config, state, box, radius_px, max_shift_px)
    if config.local_refinement:  # Gaussian priors about the input poses
        params = replace(params, prior_sigma_deg=config.prior_sigma_deg,
                         prior_sigma_shift_px=config.prior_sigma_shift_A / px)
    folds = config.alignment_folds
    aligned = (state.alignment_references if state.alignment_references is not None
               else [r for r in state.references for _ in range(folds)])
    prepared = [prepare_reference_rfft(r, config.pad) for r in aligned]
    envelopes = [amplitude_envelope(p, box) for p in prepared]
    reliable = state.r_align - config.alignment_margin_shells
    options = _estep_options(config, state)
    settings = (prepared, envelopes, noise_weights(state.sigma2, box), params, px,
                max(2.0, reliable), options)
    # hash=False: fresh keys every iteration. With content-hashed keys, a setting equal to the
    # last iteration's (the pixel size, a flag) gets the same key while that key is being
    # released, and the scheduler can lose it ("lost dependencies").
    if client is not None:
        settings = client.scatter(settings, broadcast=True, hash=False)
    step_meta = (image_model(meta, px, **{name: getattr(state, name) for name in CTF_STATE})
                 if config.use_ctf else {})
    step_meta["scale"] = state.scale
    step_meta["origin_px"] = state.origin_px
    if params.local:
        step_meta["rotation"] = state.rotation
    fulcrum = fulcrum_px(config, box, px)  # None unless a local refinement turns about one
    if config.local_refinement:  # where the priors are centred: the poses the run started from
        step_meta["prior_centre_rotation"], step_meta["prior_centre_origin_px"] = \
            input_poses(store, fulcrum)
    n_threads = sum(client.nthreads().values()) if client is not None else 1
    graph = refine_graph(store.images, step_meta, groups, 2 * n_classes * folds,
                         settings, config.pad, n_chains=config.n_chains or max(1, n_threads),
                         split_every=config.split_every, source=str(store.path),
                         chunk_size=config.chunk_size, backend=config.cluster.backend)
    t0 = time.perf_counter()
    if client is None:
        sums, results = graph.compute(scheduler="sync")
    else:
        future = client.compute(graph)
        if progress is not None:
            progress(future)
        sums, results = future.result()
    t_step = time.perf_counter() - t0
    n = info.n_particles
    fields = ("rotation", "origin_px", "error", "n_evaluations", "scale_estimate",
              "n_significant", "max_posterior", "log_likelihood", "posterior_sd_deg", "capped")
    if n_classes > 1:
        fields += ("class_id", "class_weight")
    if options.defocus_range_A > 0:
        fields += ("defocus_offset_A",)
    per_particle = {f: np.concatenate([getattr(step, f) for _, step in results]) for f in fields}
    order = np.argsort(np.concatenate([np.full(step.rotation.shape[0], start)
                                       for start, step in results]), kind="stable")
    per_particle = {f: v[order] for f, v in per_particle.items()}
    rotation, origin = per_particle["rotation"], per_particle["origin_px"]
    error, evals = per_particle["error"], per_particle["n_evaluations"]
    scale_est = per_particle["scale_estimate"]
    class_id = per_particle.get("class_id")
    noise_sums = sum(step.noise_sums for _, step in results)
    pruning = sum(step.pruning for _, step in results)  # (levels, 3)
    noise_counts = sum(step.noise_counts for _, step in results)
    phase = even = magnification = None
    if options.fit_beam_tilt:
        phase = _summed_by_group(step.phase_sums for _, step in results)
        even = _summed_by_group(step.even_sums for _, step in results)
    if options.fit_magnification:
        magnification = _summed_by_group(step.mag_sums for _, step in results)
    ctf_state, ctf_stats = refine_from_evidence(
        meta, state, per_particle.get("defocus_offset_A"), phase, even, config.defocus_range_A,
        params.r_align, box, px,
        higher_order=box * px / params.r_align <= config.higher_order_aberrations_from_A,
        mag_sums=magnification)
    # M-step per class: halves, FSC, references regularised by their FSC; noise, scales
    sums = sums.completed(box, config.symmetry)
    fold_sums = sums
    if folds > 1:  # the half sets' sums, and each half's fold sums (class · 2 + half, fold)
        shape = (2 * n_classes, folds) + sums.data.shape[1:]
        fold_sums = (sums.data.reshape(shape), sums.weight.reshape(shape))
        sums = FourierSums(fold_sums[0].sum(axis=1), fold_sums[1].sum(axis=1),
                           sums.count.reshape(2 * n_classes, folds).sum(axis=1))
    solvent_path = config.focus_mask or config.masks.mask_path
    user_mask = (read_user_mask(solvent_path, box, px).astype(np.float32)
                 if solvent_path else None)
    if user_mask is not None and fulcrum is not None:  # into the fulcrum's frame
        user_mask = np.clip(translate_volume(user_mask, -fulcrum), 0.0, 1.0)
    references, per_class, resolutions, alignment = [], [], [], []
    for k in range(n_classes):
        a, b = 2 * k, 2 * k + 1
        if sums.count[a] == 0 or sums.count[b] == 0:  # an empty class keeps its references
            references += state.references[a:b + 1]
            alignment += aligned[a * folds:(b + 1) * folds]
            per_class.append(None)
            resolutions.append(math.inf)
            continue
        halves = [reconstruct(sums.data[g], sums.weight[g], box, complete_planes=False)
                  for g in (a, b)]
        band = params.r_align if config.band_limited_reconstruction else None
        curve = within_band(fsc(halves[0] * mask, halves[1] * mask), band)
        # the user's or the dynamic mask: the references' mask and a solvent-corrected FSC
        solvent = refinement_mask(halves, resolution_at_threshold(curve, box, px, 0.143), px,
                                  user_mask, config.dynamic_mask)
        class_mask = mask if solvent is None else solvent
        if solvent is not None:
            curve = within_band(mask_corrected_fsc(halves[0], halves[1], solvent)["corrected"],
                                band)
        resolutions.append(resolution_at_threshold(curve, box, px, 0.143))
        ssnr_half = ssnr_from_fsc(curve)
        refs = [reconstruct(sums.data[g], sums.weight[g], box, ssnr=ssnr_half,
                            complete_planes=False) for g in (a, b)]
        parts = ([] if folds == 1 else
                 [r for g in (a, b) for r in fold_out_references(
                     fold_sums[0][g], fold_sums[1][g], box, ssnr_half)])
        if config.non_uniform:
            choice, cutoffs = local_cutoff_choice(halves[0], halves[1], px, resolutions[-1],
                                                  mask=class_mask)
            refs = [apply_local_filter(r, choice, cutoffs, px) for r in refs]
            parts = [apply_local_filter(r, choice, cutoffs, px) for r in parts]
        references += [(r * class_mask).astype(np.float32) for r in refs]
        alignment += [(r * class_mask).astype(np.float32) for r in parts]
        full = reconstruct(sums.data[a] + sums.data[b], sums.weight[a] + sums.weight[b], box,
                           ssnr=ssnr_from_fsc(curve, full_map=True), complete_planes=False)
        per_class.append((halves, curve, full, solvent))
    resolution = min(resolutions)
    moved = (angular_distance_deg(rotation, state.rotation) if state.rotation is not None
             else np.full(n, 180.0))
    changed = float(np.median(moved))
    class_changes = (float(np.mean(class_id != state.class_id))
                     if class_id is not None and state.class_id is not None else 1.0)
    # stale (RELION auto-refine): neither the resolution nor the poses nor the classes moved on
    improved = (resolution < state.best_resolution_A * 0.99
                or changed < 0.9 * state.best_pose_change_deg
                or (class_id is not None and class_changes > config.class_change_fraction))
    may_stop = params.local or not config.local_search
    shell = box * px / resolution
    accuracy = float(np.median(per_particle["posterior_sd_deg"]))
    # far *and* confident: particles whose posterior is broad (junk, ambiguous views) jump at
    # random from one iteration to the next and say nothing about the global search's progress
    reach = far_jump_reach_deg(accuracy, params.last_level)
    far = float(np.mean((moved > reach) & (per_particle["posterior_sd_deg"] < 0.5 * reach)))
    fraction = (per_particle["class_weight"].mean(axis=0) if config.soft_classes
                else np.bincount(class_id, minlength=n_classes) / n) if class_id is not None \
        else None
    if not config.per_class_noise:  # one model, the same row for every class
        noise_sums, noise_counts = (np.atleast_2d(noise_sums).sum(axis=0, keepdims=True),
                                    np.atleast_2d(noise_counts).sum(axis=0, keepdims=True))
    sigma2 = np.broadcast_to(class_noise_models(noise_sums, noise_counts),
                             (n_classes, np.shape(noise_sums)[-1])).copy()
    new = State(state.iteration + 1, references, sigma2,
                renormalise_scales(scale_est), rotation,
                np.clip(origin, -max_shift_px, max_shift_px),
                float(min(box / 2 - 1, shell + config.alignment_margin_shells)), resolution,
                min(resolution, state.best_resolution_A),
                0 if improved or not may_stop else state.stale + 1, class_id,
                local=params.local, level=params.last_level, pose_change_deg=changed,
                pose_change_sampling_deg=so3_grid.spacing_deg(
                    min(state.level or params.last_level, params.last_level)),
                best_pose_change_deg=min(changed, state.best_pose_change_deg),
                angular_accuracy_deg=accuracy, far_jump_fraction=far,
                class_fraction=fraction, alignment_references=alignment if folds > 1 else None,
                **ctf_state)
    stats = {"level": params.last_level, "local": params.local, "r_align_used": params.r_align,
             "local_level": params.local_level if params.local else None,
             "median_pose_change_deg": changed, "far_jump_fraction": far,
             "mean_evaluations": float(evals.mean()),
             "exhaustive_evaluations": exhaustive_evaluations(params), "time_s": t_step,
             "particles_per_s": n / t_step,
             "median_significant_poses": float(np.median(per_particle["n_significant"])),
             "mean_max_posterior": float(np.mean(per_particle["max_posterior"])),
             "angular_accuracy_deg": accuracy,
             "outlier_fraction": outlier_fraction(per_particle["log_likelihood"]),
             "scale_iqr": float(np.subtract(*np.percentile(new.scale, [75, 25]))),
             # where the bound decided and where the caps did (all levels; by level in
             # state.json): the search is a branch and bound only where the cap never fires
             "pruned_by_bound_fraction": float(pruning[:, 1].sum() / max(1, pruning[:, 0].sum())),
             "pruned_by_cap_fraction": float(pruning[:, 2].sum() / max(1, pruning[:, 0].sum())),
             "capped_fraction": float(np.mean(per_particle["capped"])),
             **ctf_stats,
             "mean_pruned_by_bound": float(pruning[:, 1].sum() / n),
             "mean_pruned_by_cap": float(pruning[:, 2].sum() / n),
             "pruning_by_level": [dict(level=int(lvl), candidates=int(c), pruned_by_bound=int(pb),
                                       pruned_by_cap=int(pc))
                                  for lvl, (c, pb, pc) in zip(search_levels(params),
                                                              pruning.tolist())],
             "arrays": {"error": error, "evaluations": evals,
                        **{f: per_particle[f] for f in ("n_significant", "max_posterior",
                                                        "log_likelihood", "posterior_sd_deg")},
                        **({"class_weight": per_particle["class_weight"]}
                           if class_id is not None else {})}}
    if class_id is not None:
        stats.update(class_sizes=np.bincount(class_id, minlength=n_classes).tolist(),
                     class_resolutions_A=resolutions, class_change_fraction=class_changes)
    return new, per_class, stats


def run_refine(config: RefineConfig, client=None, log=print, progress=None) -> dict:
    """Run (or resume) a Homogeneous Refinement; returns the summary written to summary.json.

    ``progress``: optional callable given each iteration's Dask future (e.g. a progress bar).
    """
    t_start = time.perf_counter()
    store = ParticleStore.open(config.store)
    volumes = _check_inputs(config, store)
    config = replace(config, alignment_folds=resolved_alignment_folds(
        config, store.info.box_size, config.n_classes or len(volumes)))
    with output_dir(config.out_dir) as outputs, RunLock(outputs):
        return _refine(config, store, volumes, outputs, client, log, progress, t_start)


def _refine(config: RefineConfig, store, volumes, outputs, client, log, progress,
            t_start: float) -> dict:
    """The EM loop in ``outputs`` (locked). At an output URL, each finished iteration is
    uploaded before the next starts and the final outputs at the end, ``summary.json`` last."""
    out = outputs.local
    info = store.info
    box, px = info.box_size, info.pixel_size_A
    cfg_dict = json.loads(json.dumps(asdict(config)))  # tuples as lists, as saved
    fetch_checkpoint(outputs, config.resume)
    done = check_resumable(outputs, cfg_dict, config.resume, RESUME_KEYS, LEGACY_SETTINGS)
    write_json(out / "config.json", cfg_dict)
    outputs.publish("config.json")
    meta = store.metadata(["half_set"])
    if config.use_ctf:  # the CTF, optics groups, beam tilt, Zernike terms and magnification
        meta.update(load_optics(store))
    groups = (meta["half_set"].astype(np.int64) * config.alignment_folds
              + alignment_folds(meta["half_set"], config.alignment_folds))
    radius_px, max_shift_px = _geometry(config, box, px)
    mask = _particle_mask(config, box, px)
    if done:
        state = _load_state(out, done[-1])
        log(f"resuming after iteration {state.iteration} "
            f"(resolution {state.resolution_A:.2f} Å)")
    else:
        fulcrum = fulcrum_px(config, box, px)
        if fulcrum is not None:  # the local searches turn the map about its fulcrum
            volumes = [translate_volume(v, -fulcrum) for v in volumes]
        state = _initial_state(config, store, volumes, meta, radius_px)
    finished = state.iteration > 0 and (state.stale >= config.patience
                                        or state.iteration >= config.max_iterations)

    run_id = new_run_id(_job_name(config))

    def iterate(client):
        nonlocal state
        while not (state.iteration >= config.max_iterations
                   or (state.iteration > 0 and state.stale >= config.patience)):
            with fft_workers():  # the M-step's transforms on every core
                new, per_class, stats = _run_iteration(
                    config, store, meta, groups, state, client, radius_px, max_shift_px, mask,
                    progress)
            with IterationWriter(out, new.iteration) as folder:
                _save_state(folder, new, per_class, px, stats)
            publish_iteration(outputs, new.iteration)
            log(f"iteration {new.iteration}: {new.resolution_A:.2f} Å, level "
                f"{stats['level']}{' local' if stats['local'] else ''}, aligned to shell "
                f"{stats['r_align_used']:.1f}, median pose change "
                f"{stats['median_pose_change_deg']:.2f}°, "
                f"{stats['particles_per_s']:.0f} particles/s"
                + (f", class sizes {stats['class_sizes']}, "
                   f"{100 * stats['class_change_fraction']:.1f}% changed class"
                   if "class_sizes" in stats else ""))
            publish(client, _progress_event(config, run_id, info, new, per_class, stats))
            state = new

    if not finished:
        if client is None:
            with dask_client(config.cluster, refinement_work_s(
                    info.n_particles, info.box_size, config.max_iterations)) as own:
                iterate(own)
        else:
            iterate(client)
    with fft_workers():
        summary = _write_final_outputs(config, store, outputs, state,
                                       time.perf_counter() - t_start)
    outputs.publish(last="summary.json", exclude=(ITERATIONS,))
    if client is not None:  # the page of a cluster that outlives the job: the final results
        publish(client, {"run": run_id, "iteration": state.iteration,
                         "final": final_results(summary)})
    return summary


def _job_name(config: RefineConfig) -> str:
    return "refine" if len(initial_maps(config)) == 1 else "hetero-refine"


def _progress_event(config, run_id, info, state: State, per_class, stats) -> dict:
    sizes = stats.get("class_sizes", [info.n_particles])
    classes = [None if c is None else {"fsc": c[1], "halves": c[0], "n_particles": sizes[k],
                                       "resolution_A": resolution_at_threshold(
                                           c[1], info.box_size, info.pixel_size_A, 0.143)}
               for k, c in enumerate(per_class)]
    return iteration_event(
        run=run_id, job=_job_name(config),
        out_dir=config.out_dir, iteration=state.iteration, max_iterations=config.max_iterations,
        box_size=info.box_size, pixel_size_A=info.pixel_size_A, classes=classes,
        rotation=state.rotation, stats=stats)


def _write_class_outputs(config, info, last: Path, where: Path, rotation=None,
                         band: float | None = None) -> dict:
    """Copy one class's final maps from the last iteration folder ``last`` into ``where`` and
    write its (mask-corrected) FSC report and figures (``rotation``: its particles' poses;
    ``band``: the shell its half maps' data stop at, if band-limited), plus the NU map when
    asked; returns the report."""
    px = info.pixel_size_A
    for name in ("map.mrc", "half_A.mrc", "half_B.mrc"):
        shutil.copyfile(last / name, where / f".{name}.tmp")
        (where / f".{name}.tmp").replace(where / name)
    halves = [read_map(where / f"half_{h}.mrc")[0] for h in HALVES]
    full = read_map(where / "map.mrc")[0]
    # the last iteration's solvent mask (dynamic or the user's), else the sphere
    iteration_mask = read_map(last / "mask.mrc")[0] if (last / "mask.mrc").exists() else None
    fulcrum = fulcrum_px(config, info.box_size, px)
    if fulcrum is not None:  # from the fulcrum's frame (the iterations') back to the box's
        halves = [translate_volume(h, fulcrum) for h in halves]
        full = translate_volume(full, fulcrum)
        for name, volume in zip(("half_A.mrc", "half_B.mrc", "map.mrc"), (*halves, full)):
            write_map(where / name, volume, px)
        if iteration_mask is not None:
            iteration_mask = np.clip(translate_volume(iteration_mask, fulcrum), 0.0, 1.0)
    mask = final_mask(config.masks, full, px, where,
                      fallback=(_particle_mask(config, info.box_size, px)
                                if iteration_mask is None else iteration_mask))
    report = write_fsc_report(where, halves, mask, px, title="Gold-standard FSC",
                              max_shell=band)
    pending = start_postprocess(halves, report["curves"]["corrected"], px, config.postprocess)
    report.update(write_job_figures(where, halves, full, report["curves"]["corrected"],
                                    report["resolution_A"], px, rotation, None, config.symmetry))
    solvent = (mask if (config.masks.mask_path or config.masks.auto_mask
                        or iteration_mask is not None) else None)
    post = write_postprocessed(where, halves, report["curves"]["corrected"], solvent, px,
                               config.postprocess, computed=pending)
    report["outputs"].update(post.pop("outputs"))
    report.update(post)
    if config.non_uniform:
        choice, cutoffs = local_cutoff_choice(halves[0], halves[1], px, report["resolution_A"],
                                              mask=mask)
        write_map(where / "map_nu.mrc", apply_local_filter(full, choice, cutoffs, px), px)
        write_map(where / "nu_cutoff_resolution.mrc", local_resolution_map(choice, cutoffs), px)
    return report


def _write_final_outputs(config, store, outputs, state: State, elapsed: float) -> dict:
    info = store.info
    out = outputs.local
    last = iteration_dir(out, state.iteration)
    k_total = state.n_classes
    band = (read_state(out, state.iteration)["r_align_used"]  # the last iteration's sums' band
            if config.band_limited_reconstruction else None)
    reports = {}
    for k in range(k_total):
        src = last if k_total == 1 else last / f"class_{k + 1:03d}"
        if not (src / "map.mrc").exists():  # a class that ended empty
            continue
        dst = out if k_total == 1 else out / f"class_{k + 1:03d}"
        dst.mkdir(exist_ok=True)
        reports[k + 1] = _write_class_outputs(config, info, src, dst, state.rotation if k_total == 1
                                              else state.rotation[state.class_id == k], band)
    report = reports[min(reports, key=lambda k: reports[k]["resolution_A"])]
    rows = []
    for it in completed_iterations(out):
        js = read_state(out, it)
        rows.append(js)
    per_class = {}
    for k in range(k_total if k_total > 1 else 0):
        per_class[f"class_{k + 1}_particles"] = [r["class_sizes"][k] for r in rows]
        per_class[f"class_{k + 1}_resolution_A"] = [r["class_resolutions_A"][k] for r in rows]
    if per_class:
        per_class["class_change_fraction"] = [r["class_change_fraction"] for r in rows]
    tilts = [r.get("beam_tilt_mrad") for r in rows]
    n_groups = max((len(t) for t in tilts if t), default=0)
    for g in range(n_groups):  # the beam tilt each iteration refined, per optics group
        for axis, name in enumerate("xy"):
            per_class[f"beam_tilt_{name}_mrad_group_{g + 1}"] = [
                t[g][axis] if t else math.nan for t in tilts]
    aniso = [r.get("anisotropic_magnification_percent") for r in rows]
    for g in range(max((len(a) for a in aniso if a), default=0)):
        per_class[f"anisotropic_magnification_percent_group_{g + 1}"] = [
            a[g] if a else math.nan for a in aniso]
    write_csv(out / "iterations.csv", {
        "iteration": [r["iteration"] for r in rows],
        "resolution_A": [r["resolution_A"] for r in rows],
        "search_level": [r["level"] for r in rows],
        "local_search": [int(r["local"]) for r in rows],
        "align_to_shell": [r["r_align_used"] for r in rows],
        "median_pose_change_deg": [r["median_pose_change_deg"] for r in rows],
        "mean_pose_evaluations": [r["mean_evaluations"] for r in rows],
        "particles_per_s": [r["particles_per_s"] for r in rows],
        "time_s": [r["time_s"] for r in rows],
        # (a run resumed from iterations written before a statistic existed: NaN there)
        **{name: [r.get(name, math.nan) for r in rows] for name in ITERATION_STATISTICS},
        **per_class,
    })
    image_px = store.image_pixel_sizes()  # origins in Å at each particle's own pixel size
    origin_px = state.origin_px + fulcrum_shift_px(  # back from the fulcrum's frame
        state.rotation, fulcrum_px(config, info.box_size, info.pixel_size_A))
    poses = {"rotation": state.rotation, "shift_A": origin_px * image_px[:, None],
             "scale": state.scale}
    with np.load(last / "poses.npz") as arrays:
        poses.update({k: arrays[k] for k in POSTERIOR_FIELDS})
    if any(getattr(state, name) is not None for name in CTF_STATE):
        refined = refined_columns(load_optics(store),
                                  **{name: getattr(state, name) for name in CTF_STATE})
        poses.update({k: refined[k] for k in ("defocus_u_A", "defocus_v_A", "beam_tilt_mrad",
                                              "odd_zernike", "even_zernike", "mag_matrix")
                      if k in refined})
    if state.class_id is not None:
        poses["class_id"] = state.class_id
    star = export_star(store, out / "particles.star", poses=poses)
    # a simulated store's images were just written beside the STAR: the .cs refers to them too
    export_cs(store, out / "particles.cs", poses=poses,
              stack_path=None if has_image_files(store) else star.with_suffix(".mrcs"))
    if state.class_id is not None:
        _write_class_subsets(out / "particles.star", state.class_id, k_total)
    summary = {
        "job": "refine" if k_total == 1 else "hetero-refine",
        "resolution_A": report["resolution_A"],
        "resolution_unmasked_A": report["resolution_unmasked_A"],
        "bfactor_A2": report["bfactor_A2"],
        "sharpening_bfactor_A2": report["sharpening_bfactor_A2"],
        **({"local_resolution_A": report["local_resolution_A"]}
           if "local_resolution_A" in report else {}),
        "resolution_last_iteration_A": state.resolution_A, "iterations": state.iteration,
        "converged": state.stale >= config.patience, "n_particles": info.n_particles,
        "box_size": info.box_size, "pixel_size_A": info.pixel_size_A, "time_s": elapsed,
        "outputs": {k: str(out / v) for k, v in (
            (("map", "map.mrc"), ("half_A", "half_A.mrc"), ("half_B", "half_B.mrc"),
             ("fsc", "fsc.csv"), ("fsc_plot", "fsc.png")) if k_total == 1 else ())
            + (("iterations", "iterations.csv"), ("particles", "particles.star"),
               ("particles_cs", "particles.cs"))},
    }
    if k_total == 1:
        summary["outputs"].update(report["outputs"])
    if k_total > 1:
        sizes = np.bincount(state.class_id, minlength=k_total)
        summary["classes"] = {
            k + 1: {"n_particles": int(sizes[k]),
                    "resolution_A": reports[k + 1]["resolution_A"] if k + 1 in reports else None,
                    "bfactor_A2": reports[k + 1]["bfactor_A2"] if k + 1 in reports else None,
                    "local_resolution_A": (reports[k + 1].get("local_resolution_A")
                                           if k + 1 in reports else None),
                    "map": str(out / f"class_{k + 1:03d}" / "map.mrc")}
            for k in range(k_total)}
    summary = outputs.names(summary)
    write_json(out / "summary.json", summary)
    return summary


def _write_class_subsets(star_path: Path, class_id: np.ndarray, n_classes: int) -> None:
    """``particles_class_NNN.star`` beside ``particles.star``: each class's particles (RELION
    3.1, same columns; beside it so that relative image paths stay valid)."""
    import starfile

    blocks = starfile.read(star_path, always_dict=True)
    particles = blocks["particles"]
    for k in range(n_classes):
        name = f"particles_class_{k + 1:03d}.star"
        subset = particles[class_id == k].reset_index(drop=True)
        tmp = star_path.parent / f".{name}.tmp"
        starfile.write({**blocks, "particles": subset}, tmp)
        tmp.replace(star_path.parent / name)
