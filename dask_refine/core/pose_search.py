"""Branch-and-bound pose search over SO(3) × shifts (Punjani et al. 2017), and exhaustive search.

Error of a pose (docs/design.md §3), summed over the centred-rfft pixels with ``|k| < r`` (each
pixel counted with its Hermitian multiplicity ``m_k``) and noise weights ``w_k = 1/σ²(|k|)``:

    E_r(R, o) = Σ_{|k|<r} m_k w_k |X̂_k e^{−2πi k·o/D} − s C_k Ŷ_k(R)|²

where ``o`` is the particle's origin in pixels (RELION's convention: translating the image by +o
centres it), ``Ŷ(R)`` the reference's central slice at rotation R (:mod:`.projection`), ``C`` the
CTF and ``s`` the particle's scale. The *true* error is ``E_{r_align}``.

**Lower bound.** Split at a band limit L < r_align: ``E = E_L + E_{[L, r_align)}``. E_L is exact;
the high band is bounded below without touching any projection, using ``|Ŷ_k(R)| ≤ A(|k|)``, the
largest reference amplitude that trilinear interpolation can reach at radius |k|
(:func:`amplitude_envelope`). Two valid bounds, the larger is used (both rotation- and
shift-independent): ``(‖X_hi‖_w − s‖C A‖_{w,hi})₊²`` (Cauchy–Schwarz) and
``Σ_hi m w (|X_k| − s|C_k| A_k)₊²`` (per pixel).

**Search.** Level ``first_level`` of the Hopf grid (:mod:`.so3_grid`) is evaluated in full with
a coarse shift grid; at each level the candidate with the lowest bound gets its true error E*;
every candidate whose bound exceeds ``E* + margin`` is dropped, where the grid margin is
``margin_fraction`` × the signal energy ``s²‖C Ŷ‖²`` of that candidate's band (what a pose within
the cell can still gain); at most ``max_candidates`` survive (``first_level_candidates`` from the
first level); survivors are split into their children (:func:`.so3_grid.children`), the shift
grid is halved around the best shift, and the band limit grows with the level
(``L ≈ D / (π · particle_radius · spacing)``). At the last level the survivors' true errors over the
3×3 shift grid decide.

On noisy data the high-band bound is far below the true error, nothing is pruned by it, and the
caps decide: this is then a beam search (docs/benchmarks.md). The first level's ranking rests on
the lowest band (3–4 Fourier pixels at 15°) and is the least reliable: at SNR 0.05 the true
pose's level-2 ancestor ranks up to ~900th of 4,608, and with a first-level cap of 256, 5% of
the particles of a global iteration end > 20° from a pose that scores better (2,048: none of
100; docs/benchmarks.md, "First-level cap"). ``SearchResult.pruning`` counts, level by level,
what the bound pruned and what the caps dropped.

:func:`exhaustive_search` evaluates the true error at every cell of the last level and every
shift the search can reach: the reference the tests compare against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import so3_grid
from .backend import array_module, batch_size_for_memory, free_device_bytes, kernels, to_numpy
from .fourier import rfft_frequencies, rfft_multiplicity
from .projection import extract_central_slices_rfft
from .rotations import angular_distance_deg
from .symmetry import in_asymmetric_unit, symmetry_operators

SQRT3 = float(np.sqrt(3.0))
#: a global search's second level is extracted once per batch up to this many cells (level 3)
SHARED_LEVEL_MAX_CELLS = 36_864


@dataclass(frozen=True)
class SearchParams:
    """Pose-search settings. Units: pixels (box ``D``) and Fourier pixels (cycles per box)."""

    r_align: float  # true-error band limit, Fourier pixels
    particle_radius_px: float
    first_level: int = 2
    last_level: int = 4
    max_shift_px: float = 4.0  # half-extent of the first shift grid around the prior origin
    shift_step_px: float = 1.0  # shift spacing at the last level
    margin_fraction: float = 1.0
    max_candidates: int = 256
    min_band: float = 3.0
    local: bool = False  # search only around the prior rotation (and origin)
    local_level: int | None = None  # level whose neighbourhood starts a local search
    local_psi_radius: int = 1
    symmetry: str = "C1"  # point group: global searches cover its asymmetric unit only
    # marginalisation: final poses within this error (−2 log-likelihood) of the best are
    # returned in ``SearchResult.candidates``, and no candidate within it of the best is pruned
    posterior_window: float = 0.0
    # the cap on the first level's survivors (None: ``max_candidates``): its band is the
    # lowest, its ranking the least reliable (see the module docstring)
    first_level_candidates: int | None = None
    # Gaussian priors on the pose (RELION's --sigma_ang, cryoSPARC's local refinement): every
    # candidate's error gains −2 log prior = (angle to the prior rotation / σ)² + (distance to
    # the prior origin / σ_shift)² (None: no prior on that)
    prior_sigma_deg: float | None = None
    prior_sigma_shift_px: float | None = None


@dataclass
class SearchResult:
    """Best poses for a batch: ``rotation (B, 3, 3)``, ``origin_px (B, 2)``, ``error (B,)`` (the true
    error), ``n_evaluations (B,)`` (pose × shift error evaluations, bounds and true errors alike),
    ``pruning (B, levels, 3)``: per level the candidates, those dropped because their bound
    exceeds the best true error plus margin and window ("by bound"), and those within it that
    the cap dropped ("by cap": where it is > 0 the result is a beam's, not a bound's), and,
    when asked for, a per-particle ``trace`` of every level. ``candidates``: per particle,
    ``(rotations (m, 3, 3), origins_px (m, 2), errors (m,))`` of every final-level pose whose true
    error is within ``params.posterior_window`` of the best (the best first); the poses a
    marginalised E-step weighs."""

    rotation: np.ndarray
    origin_px: np.ndarray
    error: np.ndarray
    n_evaluations: np.ndarray
    trace: list | None = None
    candidates: list | None = None
    pruning: np.ndarray | None = None  # (B, levels, 3): candidates, pruned by bound, by cap
    # the certified search (:mod:`.certified_search`): no safety valve fired (B,) bool, and
    # the Fourier-pixel·pose operations it made per particle (B,)
    certified: np.ndarray | None = None
    pixel_work: np.ndarray | None = None


@dataclass
class ParticleData:
    """One batch of particles prepared for the search (image-side quantities only)."""

    images_rfft: np.ndarray  # (B, D, H) complex, raw (un-centred) images
    ctf: np.ndarray  # (B, D, H) real
    scale: np.ndarray  # (B,) host array
    noise_weight: np.ndarray  # (D, H) real, 1/σ² per pixel, on the images' device
    # (3, 3) host: the batch's slices are taken at ``slice_matrix @ A`` for a pose A (M₃ᵀ,
    # anisotropic magnification, :func:`.aberrations.magnified_rotations`); None: at A
    slice_matrix: np.ndarray | None = None
    box_size: int = field(init=False)

    def __post_init__(self):
        self.box_size = self.images_rfft.shape[-2]


def band_pixels(box_size: int, r_lo: float, r_hi: float):
    """Flat indices, frequencies and multiplicities of rfft pixels with ``r_lo ≤ |k| < r_hi``."""
    ky, kx = rfft_frequencies(box_size, 2)
    ky, kx = np.broadcast_arrays(ky, kx)
    r = np.sqrt(kx * kx + ky * ky)
    sel = np.flatnonzero(((r >= r_lo) & (r < r_hi)).ravel())
    mult = np.broadcast_to(rfft_multiplicity(box_size, 2), ky.shape).ravel()[sel]
    return sel, kx.ravel()[sel].astype(np.float64), ky.ravel()[sel].astype(np.float64), mult


def amplitude_envelope(reference_rfft, box_size: int) -> np.ndarray:
    """``A(|k|)`` on the image rfft grid ``(D, H)``: an upper bound of ``|Ŷ_k(R)|`` for every R.

    A trilinear sample at padded radius ``ρ = pad·|k|`` is a convex combination of voxels within
    distance √3, so ``|Ŷ_k| ≤ max |V̂|`` over voxels with radius in ``[ρ − √3, ρ + √3]``.
    Computed on the host (a device reference is copied once; jobs compute it once per iteration).
    """
    reference_rfft = to_numpy(reference_rfft)
    padded = reference_rfft.shape[0]
    pad = padded // box_size
    kz, ky, kx = rfft_frequencies(padded, 3)
    rad = np.sqrt(kz.astype(float) ** 2 + ky ** 2 + kx ** 2)
    nbins = int(np.ceil(rad.max())) + 2
    bins = np.floor(rad).astype(np.int64).ravel()
    shell_max = np.zeros(nbins)
    np.maximum.at(shell_max, bins, np.abs(reference_rfft).ravel())
    # running max over the window of bins [floor(ρ − √3), floor(ρ + √3)]
    iy, ix = rfft_frequencies(box_size, 2)
    rho = pad * np.sqrt(iy.astype(float) ** 2 + ix ** 2)
    lo = np.clip(np.floor(rho - SQRT3).astype(int), 0, nbins - 1)
    hi = np.clip(np.floor(rho + SQRT3).astype(int), 0, nbins - 1)
    out = np.zeros(rho.shape)
    for a, b in set(zip(lo.ravel().tolist(), hi.ravel().tolist())):
        out[(lo == a) & (hi == b)] = shell_max[a:b + 1].max()
    return out


class _Particle:
    """Per-particle pixel data for a band: centred-rfft values at the band's pixels, on the
    images' device (``kx``, ``ky`` too); origins and rotations come from the host."""

    def __init__(self, data: ParticleData, b: int, pixels):
        sel, kx, ky, mult = pixels
        xp = self.xp = array_module(data.images_rfft)
        d = data.box_size
        sel = xp.asarray(sel)
        self.kx, self.ky = xp.asarray(kx), xp.asarray(ky)
        self.x = data.images_rfft[b].ravel()[sel].astype(xp.complex128)
        self.c = data.ctf[b].ravel()[sel].astype(xp.float64)
        self.mw = (xp.asarray(mult) * data.noise_weight.ravel()[sel]).astype(xp.float64)
        self.s = float(data.scale[b])
        self.d = d
        self.slice_matrix = data.slice_matrix

    def shifted(self, origins_px):
        """``(T, M)`` centred images ``X e^{−2πi k·o/D}`` for host origins ``(T, 2)`` (x, y)."""
        xp = self.xp
        o = xp.asarray(origins_px, dtype=xp.float64)
        ph = (-2j * np.pi / self.d) * (xp.outer(o[:, 0], self.kx) + xp.outer(o[:, 1], self.ky))
        return self.x[None, :] * xp.exp(ph)

    def errors(self, origins_px, slices):
        """Errors ``(N, T)`` of slices ``(N, M)`` (the reference's, CTF not applied) at origins,
        on the device, and the slices' energies ``(N,)``."""
        xp = self.xp
        xs = self.shifted(origins_px)  # (T, M)
        cy = slices * (self.s * self.c)[None, :]  # (N, M)
        cross = (xs * self.mw[None, :]) @ cy.conj().T  # (T, N)
        norm_x = float(xp.sum(self.mw * xp.abs(self.x) ** 2))
        norm_y = (xp.abs(cy) ** 2) @ self.mw  # (N,)
        return norm_x + norm_y[:, None] - 2.0 * cross.real.T, norm_y


def high_band_bounds(data: ParticleData, envelope, r_lo: float, r_hi: float) -> np.ndarray:
    """Lower bounds ``(B,)`` of the error's band ``[r_lo, r_hi)`` of every particle, over all
    poses (host array; computed on the images' device)."""
    n = data.images_rfft.shape[0]
    if r_lo >= r_hi:
        return np.zeros(n)
    xp = array_module(data.images_rfft)
    sel, _, _, mult = band_pixels(data.box_size, r_lo, r_hi)
    sel_d = xp.asarray(sel)
    x = xp.abs(data.images_rfft.reshape(n, -1)[:, sel_d]).astype(xp.float64)
    scale = xp.asarray(np.asarray(data.scale, np.float64)).reshape(-1, 1)
    ca = scale * xp.abs(data.ctf.reshape(n, -1)[:, sel_d]) * xp.asarray(
        np.asarray(envelope).ravel()[sel])[None, :]
    mw = (xp.asarray(mult) * data.noise_weight.ravel()[sel_d])[None, :]
    cauchy = xp.clip(xp.sqrt(xp.sum(mw * x * x, axis=1)) - xp.sqrt(xp.sum(mw * ca * ca, axis=1)),
                     0.0, None) ** 2
    per_pixel = xp.sum(mw * xp.clip(x - ca, 0.0, None) ** 2, axis=1)
    return to_numpy(xp.maximum(cauchy, per_pixel))


def high_band_bound(data: ParticleData, b: int, envelope, r_lo: float, r_hi: float) -> float:
    """Lower bound of the error's band ``[r_lo, r_hi)`` for particle ``b``, over all poses."""
    one = ParticleData(data.images_rfft[b:b + 1], data.ctf[b:b + 1],
                       np.asarray(data.scale)[b:b + 1], data.noise_weight)
    return float(high_band_bounds(one, envelope, r_lo, r_hi)[0])


def level_band(params: SearchParams, box_size: int, level: int) -> float:
    """Band limit (Fourier pixels) used for the exact part of the bound at ``level``."""
    spacing = np.deg2rad(so3_grid.spacing_deg(level))
    band = box_size / (np.pi * max(params.particle_radius_px, 1.0) * spacing)
    return float(np.clip(band, params.min_band, params.r_align))


def _slices(reference_rfft, box_size, rotations, kx, ky, slice_matrix=None):
    """Central slices at the band's pixels only: ``(N, M)`` complex128 on the reference's
    device; ``rotations`` host, ``kx``/``ky`` on the reference's device; taken at
    ``slice_matrix @ rotations`` when a (3, 3) ``slice_matrix`` is given (magnification)."""
    xp = array_module(reference_rfft)
    n = rotations.shape[0]
    if slice_matrix is not None:
        rotations = np.matmul(np.asarray(slice_matrix, np.float64), rotations)
    rotations = xp.asarray(np.ascontiguousarray(rotations, dtype=np.float64))
    kx, ky = xp.asarray(kx, dtype=xp.float64), xp.asarray(ky, dtype=xp.float64)
    out = xp.zeros((n, kx.size), dtype=reference_rfft.dtype)
    kern = kernels(xp, "auto")
    pad = reference_rfft.shape[0] // box_size
    if kern is not None:
        kern.extract_slices(xp.ascontiguousarray(reference_rfft), rotations, kx, ky,
                            xp.arange(kx.size), float(pad), out)
        return out.astype(xp.complex128)
    full = extract_central_slices_rfft(reference_rfft, rotations, box_size, kernel="numpy")
    ky_i = (ky + box_size // 2).astype(xp.int64)
    return full[:, ky_i, kx.astype(xp.int64)].astype(xp.complex128)


def asymmetric_cells(level: int, symmetry: str = "C1"):
    """Cells ``(directions, psis, rotations)`` of a grid level whose centres lie in the
    asymmetric unit of ``symmetry`` (:func:`.symmetry.in_asymmetric_unit`), widened by a cell's
    half-diagonal (√3/2 spacing) so that every pose of the unit stays reachable by the children
    of a kept cell. Level 2 keeps 53% of the cells for C4, 9% for O, 5% for I."""
    d, p = so3_grid.all_cells(level)
    rots = so3_grid.cell_rotations(level, d, p)
    if str(symmetry).upper() == "C1":
        return d, p, rots
    ops = symmetry_operators(symmetry)
    keep = in_asymmetric_unit(rots, ops, margin_deg=0.5 * np.sqrt(3) * so3_grid.spacing_deg(level))
    return d[keep], p[keep], rots[keep]


def search_levels(params: SearchParams) -> range:
    """The grid levels :func:`branch_and_bound` evaluates, first to last (a local search starts
    at ``local_level``, default the level before the last); ``SearchResult.pruning`` has one
    row per level of this range."""
    last = max(params.last_level, params.first_level)
    first = params.first_level
    if params.local:
        first = params.local_level if params.local_level is not None else max(0, last - 1)
    return range(first, max(last, first) + 1)


def prior_penalty(params: SearchParams, rotations, origins_px, centre_rotation,
                  centre_origin_px) -> np.ndarray:
    """−2 log of the Gaussian pose prior of :class:`SearchParams` (up to a constant) for poses
    ``rotations (P, 3, 3)``, ``origins_px (P, 2)`` of one particle whose prior is centred at
    ``centre_rotation (3, 3)``, ``centre_origin_px (2,)``: ``(θ/σ)² + (|Δo|/σ_shift)²``, θ the
    angle between the rotations. Zeros without priors."""
    out = np.zeros(len(origins_px))
    if params.prior_sigma_deg:
        angle = angular_distance_deg(np.asarray(rotations), np.asarray(centre_rotation)[None])
        out += (angle / params.prior_sigma_deg) ** 2
    if params.prior_sigma_shift_px:
        delta = np.asarray(origins_px, np.float64) - np.asarray(centre_origin_px)[None, :]
        out += np.sum(delta * delta, axis=1) / params.prior_sigma_shift_px ** 2
    return out


def branch_and_bound(reference_rfft, data: ParticleData, params: SearchParams,
                     prior_rotation=None, prior_origin_px=None, envelope=None,
                     trace: bool = False, prior_centre=None) -> SearchResult:
    """Best pose of every particle in ``data`` against one reference (see the module docstring).

    ``prior_origin_px`` ``(B, 2)`` centres the shift grids (default 0); with ``params.local``,
    ``prior_rotation`` ``(B, 3, 3)`` restricts the search to the neighbourhood of each prior.
    ``prior_centre``: ``(rotations (B, 3, 3), origins_px (B, 2))`` where the Gaussian priors of
    ``params`` are centred (:func:`prior_penalty`; every bound and error then includes it).
    ``trace=True`` records, per particle, one dict per level: ``level``, ``band`` (the band
    limit L, Fourier pixels), ``n_candidates``, ``n_kept``, ``bounds`` (the lower bound of every
    candidate), ``true_errors`` (E_{r_align} of every candidate, computed for the trace only),
    ``kept`` (bool mask of the candidates carried to the next level: bound ≤ best_true +
    margin, at most ``max_candidates`` of them), ``margins`` (each candidate's grid margin),
    ``rotations`` and
    ``origins_px`` of the candidates, ``best_true`` / ``best_bound`` (the best-bound candidate's
    true error and bound), ``evaluations`` (cumulative count, trace-only errors excluded) and,
    at the last level, ``final_errors`` (true errors of the survivors); ``n_pruned_bound`` and
    ``n_pruned_cap`` as in ``SearchResult.pruning``. Every bound is ≤ its
    true error; that is what makes pruning safe.
    """
    box = data.box_size
    n = data.images_rfft.shape[0]
    env = amplitude_envelope(reference_rfft, box) if envelope is None else envelope
    levels_searched = search_levels(params)
    first, last = levels_searched.start, levels_searched.stop - 1
    if params.local and prior_rotation is None:
        raise ValueError("local search needs prior rotations")
    prior_origin_px = np.zeros((n, 2)) if prior_origin_px is None else np.asarray(prior_origin_px,
                                                                                   float)
    step0 = params.shift_step_px * 2 ** (last - first)
    true_pixels = band_pixels(box, 0.0, params.r_align)
    bands = {lvl: level_band(params, box, lvl) for lvl in range(first, last + 1)}
    band_pix = {lvl: band_pixels(box, 0.0, bands[lvl]) for lvl in bands}
    bounds_hi = {lvl: high_band_bounds(data, env, bands[lvl], params.r_align) for lvl in bands}

    shared = None
    if not params.local:
        d0, p0, r0 = asymmetric_cells(first, params.symmetry)
        _, kx, ky, _ = band_pix[first]
        shared = (d0, p0, r0, _slices(reference_rfft, box, r0, kx, ky, data.slice_matrix))
    # the second level's slices, once for the batch when its particles would ask for more
    # (up to 8 × the first level's survivors each) than the level has cells
    second = None
    if (not params.local and first < last
            and so3_grid.n_rotations(first + 1) <= SHARED_LEVEL_MAX_CELLS
            and n * 8 * (params.first_level_candidates or params.max_candidates)
            > 2 * so3_grid.n_rotations(first + 1)):
        _, kx, ky, _ = band_pix[first + 1]
        second = _slices(reference_rfft, box,
                         so3_grid.cell_rotations(first + 1, *so3_grid.all_cells(first + 1)),
                         kx, ky, data.slice_matrix)

    out_rot = np.zeros((n, 3, 3))
    out_origin = np.zeros((n, 2))
    out_err = np.zeros(n)
    out_evals = np.zeros(n, dtype=np.int64)
    pruning = np.zeros((n, last - first + 1, 3), dtype=np.int64)
    traces = [] if trace else None
    candidates = []
    for b in range(n):
        p_true = _Particle(data, b, true_pixels)
        if params.local:
            dirs, psis = so3_grid.neighbourhood(first, np.asarray(prior_rotation[b]),
                                                params.local_psi_radius)
            offsets = so3_grid.shift_grid(step0, step0)
            slices = None
        else:
            dirs, psis, _, slices = shared
            offsets = so3_grid.shift_grid(params.max_shift_px, step0)
        # candidates are (rotation cell, origin) pairs; the first level takes all combinations
        n_rot = dirs.size
        pair_rot = np.repeat(np.arange(n_rot), offsets.shape[0])
        pair_origin = np.tile(prior_origin_px[b] + offsets, (n_rot, 1))
        evals = 0
        levels = []
        for lvl in range(first, last + 1):
            part = _Particle(data, b, band_pix[lvl])
            if slices is None and second is not None and lvl == first + 1:
                slices = second[dirs * so3_grid.n_psi(lvl) + psis]
            elif slices is None:
                slices = _slices(reference_rfft, box, so3_grid.cell_rotations(lvl, dirs, psis),
                                 part.kx, part.ky, part.slice_matrix)
            err, energy = _pair_errors(part, slices, pair_rot, pair_origin)
            evals += err.size
            penalty = None
            if prior_centre is not None:
                penalty = prior_penalty(params, so3_grid.cell_rotations(lvl, dirs, psis)[pair_rot],
                                        pair_origin, prior_centre[0][b], prior_centre[1][b])
                err = err + penalty
            bound = err + bounds_hi[lvl][b]
            star = int(np.argmin(bound))
            star_rot = so3_grid.cell_rotations(lvl, dirs[pair_rot[star]:pair_rot[star] + 1],
                                               psis[pair_rot[star]:pair_rot[star] + 1])
            true_star, _ = p_true.errors(pair_origin[star][None, :],
                                         _slices(reference_rfft, box, star_rot, p_true.kx,
                                                 p_true.ky, p_true.slice_matrix))
            evals += 1
            e_star = float(true_star[0, 0]) + (0.0 if penalty is None else float(penalty[star]))
            keep, within = _prune(bound, e_star, energy, params,
                                  params.first_level_candidates if lvl == first
                                  and params.first_level_candidates else params.max_candidates)
            pruning[b, lvl - first] = (bound.size, bound.size - within,
                                       max(0, within - keep.size))
            if trace:
                levels.append(_trace_level(reference_rfft, p_true, lvl, dirs, psis, pair_rot,
                                           pair_origin, bound, keep, e_star, star, evals,
                                           bands[lvl], params.margin_fraction * energy))
                levels[-1].update(n_pruned_bound=int(pruning[b, lvl - first, 1]),
                                  n_pruned_cap=int(pruning[b, lvl - first, 2]))
            if lvl == last:
                # final decision: the true error of every surviving pair (already computed
                # when this level's band is the whole alignment band)
                kr, inv = np.unique(pair_rot[keep], return_inverse=True)
                if bands[lvl] >= params.r_align:
                    true_err = err[keep]
                else:
                    fin = _slices(reference_rfft, box,
                                  so3_grid.cell_rotations(lvl, dirs[kr], psis[kr]),
                                  p_true.kx, p_true.ky, p_true.slice_matrix)
                    true_err, _ = _pair_errors(p_true, fin, inv.ravel(), pair_origin[keep])
                    evals += true_err.size
                    if penalty is not None:
                        true_err = true_err + penalty[keep]
                order = np.argsort(true_err, kind="stable")
                near = order[true_err[order] <= true_err[order[0]] + params.posterior_window]
                cells = kr[inv.ravel()[near]]
                rots = so3_grid.cell_rotations(lvl, dirs[cells], psis[cells])
                candidates.append((rots, pair_origin[keep][near], true_err[near]))
                out_rot[b], out_origin[b], out_err[b] = rots[0], pair_origin[keep][near[0]], \
                    true_err[near[0]]
                if trace:
                    levels[-1]["final_errors"] = true_err
                break
            # children (mostly 8 sub-cells, :func:`.so3_grid.children`) × the 3×3
            # half-spacing origins around each kept pair
            step = step0 / 2 ** (lvl + 1 - first)
            sub = so3_grid.shift_grid(step, step)
            cd, cp = so3_grid.children(lvl, dirs[pair_rot[keep]], psis[pair_rot[keep]])
            n_children = cd.shape[1]
            child_origin = pair_origin[keep][:, None, None, :] + sub[None, None, :, :]
            cd = np.repeat(cd[:, :, None], sub.shape[0], axis=2).ravel()
            cp = np.repeat(cp[:, :, None], sub.shape[0], axis=2).ravel()
            child_origin = np.broadcast_to(child_origin, (keep.size, n_children, sub.shape[0], 2))
            cell = cd.astype(np.int64) * so3_grid.n_psi(lvl + 1) + cp
            q = np.round(child_origin.reshape(-1, 2) * 64.0).astype(np.int64) + (1 << 20)
            key = (cell << 42) + (q[:, 0] << 21) + q[:, 1]
            first_of, _ = _first_occurrences(key)
            pair_rot, uniq_cells = pd.factorize(cell[first_of])
            dirs = uniq_cells // so3_grid.n_psi(lvl + 1)
            psis = uniq_cells % so3_grid.n_psi(lvl + 1)
            pair_origin = child_origin.reshape(-1, 2)[first_of]
            slices = None
        out_evals[b] = evals
        if trace:
            traces.append(levels)
    return SearchResult(out_rot, out_origin, out_err, out_evals, traces, candidates, pruning)


def _trace_level(reference_rfft, p_true, lvl, dirs, psis, pair_rot, pair_origin, bound, keep,
                 e_star, star, evals, band, margins) -> dict:
    """One level of a search trace (see :func:`branch_and_bound`)."""
    rotations = so3_grid.cell_rotations(lvl, dirs, psis)
    true_slices = _slices(reference_rfft, p_true.d, rotations, p_true.kx, p_true.ky,
                          p_true.slice_matrix)
    true_errors, _ = _pair_errors(p_true, true_slices, pair_rot, pair_origin)
    kept = np.zeros(bound.size, dtype=bool)
    kept[keep] = True
    return dict(level=lvl, band=band, n_candidates=int(bound.size), n_kept=int(keep.size),
                bounds=bound.copy(), true_errors=true_errors, kept=kept, margins=margins.copy(),
                rotations=rotations[pair_rot], origins_px=pair_origin.copy(), best_true=e_star,
                best_bound=float(bound[star]), evaluations=int(evals))


def search_pixel_work(result: SearchResult, params: SearchParams, box_size: int) -> np.ndarray:
    """Fourier-pixel·pose operations per particle of a :func:`branch_and_bound` result: each
    level's candidates × its band's pixels, one alignment-band error per level (the best-bound
    candidate's) and the last level's survivors' true errors where that level's band is not the
    whole band. The yardstick: :func:`exhaustive_evaluations` × the alignment band's pixels."""
    m_true = band_pixels(box_size, 0.0, params.r_align)[0].size
    work = np.zeros(result.pruning.shape[0])
    levels = search_levels(params)
    for j, lvl in enumerate(levels):
        band = level_band(params, box_size, lvl)
        cand, by_bound, by_cap = (result.pruning[:, j, i] for i in range(3))
        work += cand * band_pixels(box_size, 0.0, band)[0].size + m_true
        if lvl == levels[-1] and band < params.r_align:
            work += np.maximum(1, cand - by_bound - by_cap) * m_true
    return work


def _first_occurrences(keys):
    """``(first, inverse)`` of integer ``keys``: the index of each distinct key's first
    occurrence (in order of appearance) and each key's position among them. Hash-based
    (``pandas.factorize``), O(n): these run on ~10⁵ pairs per particle and level."""
    inverse, _ = pd.factorize(keys)
    running = np.maximum.accumulate(inverse)
    first = np.flatnonzero(np.r_[True, running[1:] > running[:-1]])
    return first, inverse


def pose_errors(reference_rfft, data: ParticleData, b: int, rotations, origins_px,
                r_align: float) -> np.ndarray:
    """The search's error ``E`` (band ``|k| < r_align``) of particle ``b`` at given poses,
    rotation ``rotations[i]`` at origin ``origins_px[i]``, against ``reference_rfft``: to score
    the poses one search found under another reference (host array ``(m,)``)."""
    part = _Particle(data, b, band_pixels(data.box_size, 0.0, r_align))
    rotations = np.asarray(rotations, np.float64).reshape(-1, 3, 3)
    key = np.round(rotations.reshape(-1, 9) * 1e9).astype(np.int64)
    _, first_of, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    slices = _slices(reference_rfft, data.box_size, rotations[first_of], part.kx, part.ky,
                     part.slice_matrix)
    err, _ = _pair_errors(part, slices, inverse.ravel(), np.asarray(origins_px, np.float64))
    return err


def _pair_errors(part: _Particle, slices, pair_rot, pair_origin):
    """Errors of (rotation, origin) pairs: ``slices[pair_rot[i]]`` at ``pair_origin[i]``.

    Returns the errors and each pair's signal energy ``s²‖C Ŷ‖²_w`` in the band, as host
    arrays (the pruning that follows runs on the host); the GEMM runs on the slices' device.
    """
    xp = part.xp
    cy = slices * (part.s * part.c)[None, :]
    energy_rot = (xp.abs(cy) ** 2) @ part.mw
    norm_x = float(xp.sum(part.mw * xp.abs(part.x) ** 2))
    q = np.round(pair_origin * 64.0).astype(np.int64)  # origins lie on a lattice of ≥ 1/64 px
    first_of, inverse = _first_occurrences((q[:, 0] << 32) + q[:, 1])
    xs = part.shifted(pair_origin[first_of]) * part.mw[None, :]  # (U, M)
    cross = (cy.conj() @ xs.T).real  # (rotations, U): one GEMM, then pick the pairs
    rot_d, origin_d = xp.asarray(pair_rot), xp.asarray(inverse.ravel())
    err = norm_x + energy_rot[rot_d] - 2.0 * cross[rot_d, origin_d]
    return to_numpy(err), to_numpy(energy_rot[rot_d])


def _prune(bound, e_star, energy, params: SearchParams, cap: int):
    """Indices of candidates whose bound is within ``e_star`` + their grid margin + the
    posterior window, at most ``cap`` of them (the lowest bounds); and how many were within."""
    margin = params.margin_fraction * energy + params.posterior_window
    keep = np.flatnonzero(bound <= e_star + margin)
    within = int(keep.size)
    if keep.size == 0:
        keep = np.array([int(np.argmin(bound))])
    if keep.size > cap:  # the cap: the lowest bounds (ties by index)
        b = bound[keep]
        cut = np.partition(b, cap - 1)[cap - 1]
        tied = keep[b == cut][: cap - int(np.count_nonzero(b < cut))]
        keep = np.sort(np.concatenate([keep[b < cut], tied]))
    return keep, within


def reachable_origins(params: SearchParams) -> np.ndarray:
    """Every origin offset (around the prior) that :func:`branch_and_bound` can return."""
    first = params.first_level
    last = max(params.last_level, first)
    step0 = params.shift_step_px * 2 ** (last - first)
    reach = so3_grid.shift_grid(params.max_shift_px, step0)[:, 0].max() + step0 - params.shift_step_px
    return so3_grid.shift_grid(reach, params.shift_step_px)


def exhaustive_evaluations(params: SearchParams) -> int:
    """Error evaluations per particle that :func:`exhaustive_search` makes for ``params``: every
    cell of the last level in the asymmetric unit × every reachable origin. The yardstick for
    the branch-and-bound counts in ``SearchResult.n_evaluations``."""
    return _n_cells(max(params.last_level, params.first_level), params.symmetry) * int(
        reachable_origins(params).shape[0])


@functools.lru_cache(maxsize=32)
def _n_cells(level: int, symmetry: str) -> int:
    if str(symmetry).upper() == "C1":
        return so3_grid.n_rotations(level)
    return int(asymmetric_cells(level, symmetry)[2].shape[0])


def exhaustive_search(reference_rfft, data: ParticleData, params: SearchParams,
                      prior_origin_px=None, batch_rotations: int | None = None) -> SearchResult:
    """True error at every cell of ``params.last_level`` × every reachable origin; the optimum.

    Rotations are evaluated ``batch_rotations`` at a time (default 8192 on the host; on a GPU
    as many as fit in a quarter of the free device memory)."""
    box = data.box_size
    n = data.images_rfft.shape[0]
    prior_origin_px = np.zeros((n, 2)) if prior_origin_px is None else np.asarray(prior_origin_px,
                                                                                   float)
    _, _, rots = asymmetric_cells(params.last_level, params.symmetry)
    pixels = band_pixels(box, 0.0, params.r_align)
    offsets = reachable_origins(params)
    best = np.full(n, np.inf)
    best_rot = np.zeros((n, 3, 3))
    best_origin = np.zeros((n, 2))
    parts = [_Particle(data, b, pixels) for b in range(n)]
    if batch_rotations is None:
        xp = array_module(data.images_rfft)
        # per rotation: a complex128 slice and its CTF-ed copy (M each), errors over the origins
        per_rotation = 16 * 2 * pixels[0].size + 8 * 2 * offsets.shape[0]
        batch_rotations = batch_size_for_memory(per_rotation, free_device_bytes(xp), 8192,
                                                minimum=64)
    for start in range(0, rots.shape[0], batch_rotations):
        r = rots[start:start + batch_rotations]
        slices = _slices(reference_rfft, box, r, pixels[1], pixels[2], data.slice_matrix)
        for b, part in enumerate(parts):
            origins = prior_origin_px[b][None, :] + offsets
            err, _ = part.errors(origins, slices)
            flat = int(err.argmin())
            i, t = np.unravel_index(flat, err.shape)
            e = float(err.ravel()[flat])
            if e < best[b]:
                best[b], best_rot[b], best_origin[b] = e, r[i], origins[t]
    evals = np.full(n, rots.shape[0] * offsets.shape[0], dtype=np.int64)
    return SearchResult(best_rot, best_origin, best, evals)


def pose_error(reference_rfft, data: ParticleData, rotations, origins_px, r_align: float):
    """True errors ``(B,)`` of given poses (same definition as the search)."""
    pixels = band_pixels(data.box_size, 0.0, r_align)
    out = np.zeros(data.images_rfft.shape[0])
    for b in range(out.size):
        part = _Particle(data, b, pixels)
        err, _ = part.errors(np.asarray(origins_px[b], float)[None, :],
                             _slices(reference_rfft, data.box_size, rotations[b:b + 1],
                                     part.kx, part.ky, part.slice_matrix))
        out[b] = float(err[0, 0])
    return out
