"""The jobs' settings: the configuration dataclasses of Reconstruction Only and of the
refinements, with their option groups (masks, the dynamic mask, postprocessing).

They live apart from the jobs so that reading them is cheap: the command line builds its options,
defaults and help from them without importing the numerical code (``dask-refine --help`` and
``refine --help`` start in a fraction of a second; docs/benchmarks.md, "Cold start").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.projection import DEFAULT_PAD
from ..io.errors import InputError
from ..parallel.cluster import ClusterConfig


@dataclass(frozen=True)
class MaskOptions:
    """``mask_path``: a user mask; ``auto_mask``: a solvent mask from the full map, low-passed
    to ``auto_mask_lowpass_A``, thresholded at ``auto_mask_threshold`` × its maximum, extended by
    ``auto_mask_extend_px`` and given a ``auto_mask_soft_edge_px`` cosine edge."""

    mask_path: str | None = None
    auto_mask: bool = False
    auto_mask_lowpass_A: float = 15.0
    auto_mask_threshold: float = 0.2
    auto_mask_extend_px: float = 3.0
    auto_mask_soft_edge_px: float = 6.0


@dataclass(frozen=True)
class DynamicMask:
    """cryoSPARC's dynamic mask, rebuilt from each iteration's half maps once the resolution
    reaches ``start_A``: their average low-passed to the resolution, thresholded at
    ``threshold`` × its maximum, 1 within ``near_A`` of that and a raised-cosine fall-off to 0 at
    ``far_A``."""

    start_A: float = 12.0
    threshold: float = 0.2
    near_A: float = 6.0
    far_A: float = 14.0


@dataclass(frozen=True)
class PostprocessOptions:
    """``bfactor_A2``: the sharpening B-factor (Å², negative sharpens; None: fitted to the
    Guinier plot from 10 Å on, RELION's ``--auto_bfac``). ``mtf_path``: the detector's MTF in
    RELION's STAR format, its frequencies in 1/pixel of ``mtf_pixel_size_A`` (the micrographs'
    pixel size; None: the map's). ``local_resolution``: write the local resolution, in windows
    ``local_resolution_sampling_A`` apart (RELION's ``--locres_sampling``)."""

    bfactor_A2: float | None = None
    mtf_path: str | None = None
    mtf_pixel_size_A: float | None = None
    local_resolution: bool = True
    local_resolution_sampling_A: float = 25.0


@dataclass(frozen=True)
class ReconstructConfig:
    """Reconstruction Only. ``mask_diameter_A``: soft spherical mask for the FSC (None: unmasked);
    ``chunk_size``: particles per task (None: the store's chunks, evened out over the chains);
    ``n_chains``: parallel accumulation chains (None: one per worker thread); ``symmetry``: point group applied to
    the sums before reconstruction (RELION's ``--sym``); ``masks``: a user or automatic solvent
    mask for the final, mask-corrected FSC (:mod:`.masking`); ``classes``: heterogeneous
    reconstruction, ``"labels"`` (the store's class labels, hard) or a ``.npy`` file of
    ``(N, K)`` class probabilities (soft); maps then go to ``class_001/`` … ``class_K/``."""

    store: str
    out_dir: str
    pad: int = DEFAULT_PAD
    use_ctf: bool = True
    mask_diameter_A: float | None = None
    chunk_size: int | None = None
    n_chains: int | None = None
    split_every: int = 4
    symmetry: str = "C1"
    masks: MaskOptions = field(default_factory=MaskOptions)
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    classes: str | None = None
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True)
class RefineConfig:
    """Homogeneous Refinement. Defaults follow cryoSPARC/RELION practice.

    ``masks.mask_path`` (a user mask) or ``dynamic_mask`` (:class:`.masking.DynamicMask`)
    replace the sphere as the references' mask and give a solvent-corrected FSC every
    iteration (RELION's ``--solvent_mask --solvent_correct_fsc``); the mask of each iteration is
    written beside its maps (``mask.mrc``).
    ``mask_diameter_A``: soft spherical mask for references and FSC, also the particle size for
    the search (None: 80% of the box). ``max_shift_A``: half-extent of the shift search
    (None: 10% of the box). ``local_search``: once the median pose change of an iteration
    has fallen below its angular sampling (and after at least ``min_global_iterations``
    global iterations, with at most ``max_far_jump_fraction`` of the particles still jumping
    decisively beyond a local search's reach), search only around the previous poses, over
    ±3 times the particles' current angular accuracy (RELION auto-refine likewise switches to
    local searches by the state of the poses). ``alignment_margin_shells``: Fourier shells
    beyond the current resolution used for alignment. ``band_limited_reconstruction``:
    backproject only inside that band and take the FSC as zero beyond it (RELION's
    ``current_size``), so the
    resolution grows by at most the margin per iteration (docs/design-notes.md, "The band grows
    with the resolution"). ``marginalize``: backproject every particle over its
    significant poses with their posterior weights (RELION's expectation step); False: at its
    best pose only.

    Stopping (RELION auto-refine's rule): an iteration is *stale* when the resolution has not
    improved by 1%, the median pose change is no smaller than the smallest before it (minus
    10%), and (heterogeneous) fewer than ``class_change_fraction`` of the particles changed
    class; the run stops after ``patience`` stale iterations in a row, once local searches
    have started (or with ``local_search`` off), or after ``max_iterations``.

    Heterogeneous Refinement: ``initial_map`` is a tuple of K maps (one class each, normalised
    to the particles' greyscale separately), or one map and ``n_classes`` = K: every class
    starts from that map, and the first iteration puts each particle into a random class
    (RELION's random subsets; seed ``random_seed``) so that the classes can diverge; every
    particle is searched against every class;
    ``soft_classes`` (the default): backprojected into each class over its poses with the joint
    posterior over classes and poses, class priors the last iteration's class fractions; else
    assigned to its most probable class. ``cross_half_classes`` (the default): the class
    posterior of a particle is measured on the other half set's class references, at the poses
    its own half's search found (docs/design-notes.md, "Classes judged on the other half").
    ``per_class_noise``: one noise model per class (each particle's residuals weighed by its
    class posterior); off by default, one shared model as RELION's, because on classes of
    one protein the models' estimation noise biases every particle toward the larger class
    (docs/design-notes.md, "Per-class noise").

    CTF refinement (docs/design.md §3; :mod:`..core.ctf_refine`), once an iteration starts at
    ``ctf_refine_from_A`` or better: ``per_particle_defocus`` refits each particle's defocus
    (U and V together, within ± ``defocus_range_A`` of the file's; then U and V apart with
    ``per_particle_astigmatism``) at its best pose, and
    ``per_group_ctf`` each optics group's beam tilt, from the phases the particles leave against
    their references, and once the alignment band reaches ``higher_order_aberrations_from_A``
    its trefoil and fourth-order even aberrations (C_s, tetrafoil) where they are
    significant, and its anisotropic magnification from the references' gradients where
    significant. The refined values go into ``particles.star``, ``particles.cs`` and
    iterations.csv.

    Non-Uniform Refinement (``non_uniform``): each iteration's references are also filtered
    locally, per voxel, to the cutoff that best predicts the other half map
    (:mod:`..core.nonuniform`); the final outputs add ``map_nu.mrc`` and
    ``nu_cutoff_resolution.mrc`` (each voxel's chosen filter cutoff).

    Every run also writes the sharpened map and the local resolution of its final half maps
    (``postprocess``, :mod:`.postprocess`).
    """

    store: str
    initial_map: str | tuple[str, ...]
    out_dir: str
    n_classes: int | None = None  # K classes from one initial map (None: one per map)
    random_seed: int = 0
    soft_classes: bool = True
    cross_half_classes: bool = True
    per_class_noise: bool = False
    class_change_fraction: float = 0.01
    marginalize: bool = True
    non_uniform: bool = False
    initial_lowpass_A: float = 30.0
    max_iterations: int = 15
    patience: int = 2
    mask_diameter_A: float | None = None
    max_shift_A: float | None = None
    shift_step_px: float = 1.0  # largest final shift step; finer as the alignment band grows
    first_level: int = 2
    max_level: int = 8
    max_global_level: int = 5  # global searches stop at 1.9°; finer sampling is searched locally
    first_level_candidates: int = 8192  # survivors of a global search's first (15°) level
    # each particle is aligned against its half's map without its fold (None: automatic,
    # resolved_alignment_folds; 1: against the half map itself, which holds the particle)
    alignment_folds: int | None = None
    local_search: bool = True
    min_global_iterations: int = 2
    # stay global while more than this share of the particles moved, decisively, farther than
    # a local search could have taken them (see _search_params)
    max_far_jump_fraction: float = 0.02
    alignment_margin_shells: float = 4.0
    band_limited_reconstruction: bool = True
    use_ctf: bool = True
    # CTF refinement inside refinement, from the first iteration that starts at a resolution
    # of ctf_refine_from_A or better (cryoSPARC's default threshold)
    per_particle_defocus: bool = False
    per_particle_astigmatism: bool = False
    defocus_range_A: float = 2000.0
    per_group_ctf: bool = False
    ctf_refine_from_A: float = 8.0
    # per_group_ctf fits trefoil and the fourth-order even terms (C_s, tetrafoil) only once
    # the alignment band reaches this resolution: coarser bands cannot tell them apart
    higher_order_aberrations_from_A: float = 4.0
    symmetry: str = "C1"
    masks: MaskOptions = field(default_factory=MaskOptions)
    # cryoSPARC's dynamic mask for the references from dynamic_mask.start_A on (None: the
    # sphere, or the user's --mask, every iteration)
    dynamic_mask: DynamicMask | None = None
    # local refinement (cryoSPARC's Local Refinement, RELION's --sigma_ang): start from the
    # store's poses, search locally under Gaussian priors centred on them; focus_mask masks
    # the references (the alignment sees its region only)
    local_refinement: bool = False
    prior_sigma_deg: float = 5.0
    prior_sigma_shift_A: float = 3.0
    focus_mask: str | None = None
    # the centre the local searches rotate about, (x, y, z) Å from the box centre (None: the
    # focus mask's centre of mass, else the box centre)
    fulcrum_A: tuple[float, float, float] | None = None
    # symmetry relaxation (cryoSPARC's, RELION's --relax_sym): each local search starts from
    # the best of the particle's poses related by this group (the map refined in C1 or lower)
    relax_symmetry: str | None = None
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    pad: int = DEFAULT_PAD
    chunk_size: int | None = None
    n_chains: int | None = None
    split_every: int = 4
    resume: bool = False
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        if self.n_classes is not None and self.n_classes < 1:
            raise InputError("n_classes", f"must be at least 1, not {self.n_classes}")
        if self.n_classes is not None and not isinstance(self.initial_map, (str, Path)) \
                and len(self.initial_map) not in (1, self.n_classes):
            raise InputError("initial_map", f"{len(self.initial_map)} maps for "
                             f"{self.n_classes} classes: give one map per class, or one map")
        if self.alignment_folds is not None and self.alignment_folds < 1:
            raise InputError("alignment_folds", f"must be at least 1, not {self.alignment_folds}")
        if not self.defocus_range_A > 0:
            raise InputError("defocus_range_A", f"must be > 0 Å, not {self.defocus_range_A}")
        if self.first_level_candidates < 1:
            raise InputError("first_level_candidates",
                             f"must be at least 1, not {self.first_level_candidates}")
