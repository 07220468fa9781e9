"""Branch-and-bound pose search over SO(3) × shifts (Punjani et al. 2017), and exhaustive search.

Error of a pose (DESIGN §3), summed over the centred-rfft pixels with ``|k| < r`` (each pixel
counted with its Hermitian multiplicity ``m_k``) and noise weights ``w_k = 1/σ²(|k|)``:

    E_r(R, o) = Σ_{|k|<r} m_k w_k |X̂_k e^{−2πi k·o/D} − s C_k Ŷ_k(R)|²  =  ‖X − M(R, o)‖²_w

where ``o`` is the particle's origin in pixels (RELION's convention: translating the image by +o
centres it), ``Ŷ(R)`` the reference's central slice at rotation R (:mod:`.projection`), ``C`` the
CTF, ``s`` the particle's scale and ``M(R, o) = s C Ŷ(R) e^{+2πi k·o/D}`` the shifted model. The
*true* error is ``E = E_{r_align}``; it is −2 log-likelihood (up to a constant) under the noise
model ``X = M(R₀, o₀) + N``, ``N`` circular complex Gaussian with ``E|N_k|² = 1/w_k``.

**Lower bound of a cell** (:func:`cell_lower_bounds`). A candidate is a rotation cell of level l
and an origin ``o_c``; what the search may still return from it is every last-level descendant
cell R_d (:func:`.so3_grid.descendant_cells`) with every reachable origin ``o = o_c + δ``,
``|δ_x|, |δ_y| ≤ h_l`` (``h_l = 0`` with the default ``coarse_shifts=False``: every level searches
the final shift grid; else ``h_l = step_l − step_last``). Split the error at a band limit
L ≤ r_align, ``E = E_L + E_{[L, r_align)}``, and bound each part over the whole cell:

* *Low band, deterministic.* By the triangle inequality, for every pose (R_d, o) of the cell
  ``√E_L(R_d, o) ≥ √E_L(R_c, o_c) − Δ`` with ``Δ ≥ ‖M(R_d, o) − M(R_c, o_c)‖_w`` over
  ``|k| < L``. Per pixel ``|M_k(R_d, o) − M_k(R_c, o_c)| ≤ s|C_k| (S_k + |Ŷ_k(R_c)| φ_k)``,
  where ``S_k = max_d |Ŷ_k(R_d) − Ŷ_k(R_c)|`` is the exact spread of the slices over the cell's
  descendants (:func:`rotation_spread`, a reference-side table shared by all particles) and
  ``φ_k = min(2, 2π h_l (|k_x| + |k_y|)/D) ≥ |e^{2πi k·δ/D} − 1|``; so
  ``Δ = s‖C (S + |Ŷ(R_c)| φ)‖_w`` (:func:`cell_deltas`) and
  ``E_L(R_d, o) ≥ (√E_L(R_c, o_c) − Δ)₊²`` for every image, no assumption.
* *High band, probabilistic.* Under the noise model, ``X = S + N`` (here S is the image's
  signal, a reference projection), ``E_hi(R, o) = ‖X_hi‖² + P(R) − 2Re⟨X_hi, M_hi(R, o)⟩_w``
  with ``P(R) = ‖M_hi(R, o)‖²_w``. For a pose fixed independently of the noise,
  ``−2Re⟨N, M⟩_w`` is Gaussian with mean 0 and variance exactly ``4P(R)`` (each independent
  Hermitian pair, or self-conjugate pixel, contributes ``m_k w_k |M_k|²`` to the variance of
  ``Re⟨N, M⟩_w``; a phase shift keeps N's law). Two bounds follow, with ``z = Φ⁻¹(1 − ε/3)``:

  - cryoSPARC's (Punjani et al. 2017, Suppl. Note 2): ``P − 2Re⟨S, M⟩ ≥ P − 2‖S‖√P ≥
    −‖S‖² ≥ −P_max`` with ``P_max = s²‖C A‖²_{w,hi} ≥ P(R), ‖S_hi‖²`` (``A`` the amplitude
    envelope, :func:`amplitude_envelope`), so ``E_hi ≥ ‖X_hi‖²_w − P_max − τ√P_max``,
    ``τ = 2z``, except with probability ε/3;
  - χ²: ``E_hi = ‖N‖² + ‖S − M‖² + 2Re⟨N, S − M⟩ ≥ ‖N_hi‖²_w − z²`` except with probability
    ε/3 (``a² − 2za ≥ −z²``), and ``‖N_hi‖²_w ~ χ²_d`` with ``d = Σ m_k`` over the band's
    pixels, ``≥ d − 2√(d ln(3/ε))`` except with probability ε/3 (Laurent & Massart 2000).

  ``H = max(0, H_det, H_cs, H_χ)`` (:func:`search_high_band_bounds`; ``H_det`` the deterministic
  bounds of :func:`high_band_bounds`) fails with probability ≤ ε per pose (union bound).

So for every pose of the cell fixed independently of the noise, with probability ≥ 1 − ε,

    E(R_d, o) ≥ LB(cell) = (√E_L(R_c, o_c) − Δ)₊² + H.

ε is ``failure_probability`` (default 10⁻³: τ = 6.8 — cryoSPARC's τ = 4 corresponds to a
per-term ε of 2.3%). Assumptions: the Gaussian noise model with the given weights
(``w_k = 1/E|N_k|²``; a noise estimate that is too large makes ``H_cs`` safer but ``H_χ`` less
safe) and a signal bounded by the reference's envelope. ``failure_probability = 0`` keeps only
the deterministic bounds (for noise-free data or no noise model). The guarantee is per pose,
not simultaneous over all poses. The low-band part holds for every image.

**Search.** Level ``first_level`` of the Hopf grid (:mod:`.so3_grid`) is evaluated in full with
its shift grid. Every level is evaluated band by band (:func:`level_cascade`: the band limit
grows by √2 per step up to ``L_l ≈ band_fraction · D / (π · particle_radius · spacing_l)``,
``r_align`` at the last level, each step adding only the new ring of pixels) and candidates are
pruned after every step when ``LB > E* + posterior_window``, E* being the best true error of a
*last-level* pose found so far (the ``descents`` candidates with the lowest centre errors are
followed greedily to the last level). At most ``max_candidates`` survive a step (a safety valve
for memory: when it drops a candidate that the bound kept, the particle is reported
``certified = False``). Survivors are split into their children (× the sub-shifts when
``coarse_shifts``). At the last level the bound is the true error and decides. With
``certified`` the result is, with the probability above for each pose, the optimum of the
last-level grid (what :func:`exhaustive_search` returns) and ``candidates`` holds every pose
within ``posterior_window`` of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from . import so3_grid
from .backend import array_module, batch_size_for_memory, free_device_bytes, kernels, to_numpy
from .fourier import rfft_frequencies, rfft_multiplicity
from .projection import extract_central_slices_rfft
from .symmetry import in_asymmetric_unit, symmetry_operators

SQRT3 = float(np.sqrt(3.0))


@dataclass(frozen=True)
class SearchParams:
    """Pose-search settings. Units: pixels (box ``D``) and Fourier pixels (cycles per box)."""

    r_align: float  # true-error band limit, Fourier pixels
    particle_radius_px: float
    first_level: int = 2
    last_level: int = 4
    max_shift_px: float = 4.0  # half-extent of the first shift grid around the prior origin
    shift_step_px: float = 1.0  # shift spacing at the last level
    margin_fraction: float = 1.0  # unused (the old heuristic margin); kept for old configurations
    # safety valve: at most this many (cell, origin) pairs survive a level; when it drops a
    # candidate that the bound kept, the particle is not certified
    max_candidates: int = 2_000_000
    min_band: float = 3.0
    local: bool = False  # search only around the prior rotation (and origin)
    local_level: int | None = None  # level whose neighbourhood starts a local search
    local_psi_radius: int = 1
    symmetry: str = "C1"  # point group: global searches cover its asymmetric unit only
    # marginalisation: final poses within this error (−2 log-likelihood) of the best are
    # returned in ``SearchResult.candidates``, and no candidate within it of the best is pruned
    posterior_window: float = 0.0
    # ε: per pose, the probability (under the Gaussian noise model) that the cell bound exceeds
    # the pose's true error (module docstring); 0: deterministic bounds only
    failure_probability: float = 1e-3
    # band limit of level l: band_fraction · D / (π · particle_radius · spacing_l) (clipped to
    # [min_band, r_align]); the last level uses r_align (its bound is the true error)
    band_fraction: float = 1.0
    band_ratio: float = float(np.sqrt(2.0))  # cascade of bands within a level (level_cascade)
    # False: every level searches the final shift grid, so a cell holds no shift spread
    # (h_l = 0); True: the shift grid is halved with the levels (3×3 sub-shifts per child)
    coarse_shifts: bool = False
    descents: int = 10  # candidates followed greedily to the last level at each step (for E*)

    @property
    def tau(self) -> float:
        """τ of cryoSPARC's high-band term: ``2 Φ⁻¹(1 − ε/3)`` (∞ for ε = 0, which keeps only
        the deterministic bounds)."""
        eps = float(self.failure_probability)
        if eps <= 0.0:
            return float("inf")
        return 2.0 * NormalDist().inv_cdf(1.0 - min(eps / 3.0, 0.5))


@dataclass
class SearchResult:
    """Best poses for a batch: ``rotation (B, 3, 3)``, ``origin_px (B, 2)``, ``error (B,)`` (the true
    error), ``n_evaluations (B,)`` (pose × shift error evaluations, bounds and true errors alike),
    and, when asked for, a per-particle ``trace`` of every level. ``candidates``: per particle,
    ``(rotations (m, 3, 3), origins_px (m, 2), errors (m,))`` of every final-level pose whose true
    error is within ``params.posterior_window`` of the best (the best first); the poses a
    marginalised E-step weighs. ``certified (B,)``: no candidate was dropped by the
    ``max_candidates`` cap, only by the bound. ``n_pixel_evaluations (B,)``: the work, each
    evaluation counted by the Fourier pixels it touches (a band-L evaluation: the pixels
    ``|k| < L``)."""

    rotation: np.ndarray
    origin_px: np.ndarray
    error: np.ndarray
    n_evaluations: np.ndarray
    trace: list | None = None
    candidates: list | None = None
    certified: np.ndarray | None = None
    n_pixel_evaluations: np.ndarray | None = None
    # per particle, per (level, band) step: (level, band, n_candidates, n_pruned_bound,
    # n_pruned_cap)
    pruning: list | None = None


@dataclass
class ParticleData:
    """One batch of particles prepared for the search (image-side quantities only)."""

    images_rfft: np.ndarray  # (B, D, H) complex, raw (un-centred) images
    ctf: np.ndarray  # (B, D, H) real
    scale: np.ndarray  # (B,) host array
    noise_weight: np.ndarray  # (D, H) real, 1/σ² per pixel, on the images' device
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


def chi_square_lower(dof: float, failure_probability: float) -> float:
    """``q`` with ``P[χ²_dof < q] ≤ ε`` (Laurent & Massart 2000: ``P[χ²_d ≤ d − 2√(d x)] ≤
    e^{−x}``), floored at 0."""
    if dof <= 0 or failure_probability <= 0:
        return 0.0
    return max(0.0, dof - 2.0 * np.sqrt(dof * np.log(1.0 / failure_probability)))


def search_high_band_bounds(data: ParticleData, envelope, r_lo: float, r_hi: float,
                            failure_probability: float) -> np.ndarray:
    """Lower bounds ``(B,)`` of the error's band ``[r_lo, r_hi)`` used by the search (host):
    ``H = max(H_det, H_cs, H_χ)``, with ``ε`` split in three equal parts (module docstring):

    * ``H_det`` = :func:`high_band_bounds` (always valid);
    * ``H_cs = ‖X_hi‖²_w − P_max − τ√P_max``, ``P_max = s²‖C A‖²_{w,hi}``, ``τ = 2Φ⁻¹(1 − ε/3)``;
    * ``H_χ = q_{ε/3}(d_hi) − z²``, ``z = Φ⁻¹(1 − ε/3)``, ``d_hi = Σ m_k`` over the band's pixels
      with ``w_k > 0`` (the χ² degrees of freedom of ``‖N_hi‖²_w``, :func:`chi_square_lower`).

    Both probabilistic terms fail with probability ≤ 2ε/3 per pose under the Gaussian noise
    model; ``failure_probability = 0`` leaves only ``H_det``."""
    det = high_band_bounds(data, envelope, r_lo, r_hi)
    eps = float(failure_probability)
    if r_lo >= r_hi or eps <= 0.0:
        return det
    n = data.images_rfft.shape[0]
    z = NormalDist().inv_cdf(1.0 - min(eps / 3.0, 0.5))
    xp = array_module(data.images_rfft)
    sel, _, _, mult = band_pixels(data.box_size, r_lo, r_hi)
    sel_d = xp.asarray(sel)
    x2 = xp.abs(data.images_rfft.reshape(n, -1)[:, sel_d]).astype(xp.float64) ** 2
    scale = xp.asarray(np.asarray(data.scale, np.float64)).reshape(-1, 1)
    ca = scale * xp.abs(data.ctf.reshape(n, -1)[:, sel_d]) * xp.asarray(
        np.asarray(envelope).ravel()[sel])[None, :]
    w = data.noise_weight.ravel()[sel_d]
    mw = (xp.asarray(mult) * w)[None, :]
    p_max = xp.sum(mw * ca * ca, axis=1)
    cs = to_numpy(xp.sum(mw * x2, axis=1) - p_max - 2.0 * z * xp.sqrt(p_max))
    dof = float(np.sum(mult[to_numpy(w) > 0]))
    chi = chi_square_lower(dof, eps / 3.0) - z * z
    return np.maximum(np.maximum(det, cs), max(chi, 0.0))


def rotation_spread(reference_rfft, box_size: int, level: int, last_level: int, directions,
                    psis, centre_slices, kx, ky, chunk: int = 4096):
    """``S (n, M)``: for each cell of ``level`` and each band pixel, the largest
    ``|Ŷ_k(R_d) − Ŷ_k(R_c)|`` over the cell's last-level descendants d
    (:func:`.so3_grid.descendant_cells`), ``centre_slices (n, M)`` being ``Ŷ(R_c)``. Exact over
    what the search can return from the cell; zeros at the last level. Returns ``(S,
    n_descendant_pixels)`` (the work: descendants × M)."""
    xp = array_module(centre_slices)
    n, m = centre_slices.shape
    out = xp.zeros((n, m), dtype=xp.float64)
    if level >= last_level or n == 0:
        return out, 0
    work = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        owner, dd, dp = so3_grid.descendant_cells(level, directions[start:stop],
                                                  psis[start:stop], last_level)
        yd = _slices(reference_rfft, box_size, so3_grid.cell_rotations(last_level, dd, dp),
                     kx, ky)
        diff = xp.abs(yd - centre_slices[start + xp.asarray(owner)])
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        if xp is np:
            out[start + owner[starts]] = np.maximum.reduceat(diff, starts, axis=0)
        else:  # segment max on the device: sort-free scatter via a loop over descendant rank
            seg = np.diff(np.r_[starts, owner.size])
            for r in range(int(seg.max())):
                rows = starts[seg > r] + r
                idx = xp.asarray(start + owner[rows])
                out[idx] = xp.maximum(out[idx], diff[xp.asarray(rows)])
        work += int(owner.size) * m
    return out, work


def cell_deltas(part: "_Particle", spread, centre_slices, half_shift_px: float):
    """``Δ (n,)`` of one particle for cells with centre slices ``Ŷ(R_c) (n, M)`` and spreads
    ``S (n, M)`` (:func:`rotation_spread`): for every last-level descendant R_d of a cell and
    every origin ``o = o_c + δ``, ``|δ|_∞ ≤ half_shift_px``,
    ``‖M(R_d, o) − M(R_c, o_c)‖_w ≤ Δ = s‖C (S + |Ŷ(R_c)| φ)‖_w`` over the band, with
    ``φ_k = min(2, 2π·half_shift_px·(|k_x| + |k_y|)/D) ≥ |e^{2πi k·δ/D} − 1|`` (triangle
    inequality per pixel), so ``E_L(R_d, o) ≥ (√E_L(R_c, o_c) − Δ)₊²`` (deterministic)."""
    xp = part.xp
    phase = xp.minimum(2.0, 2.0 * np.pi * half_shift_px * (xp.abs(part.kx) + xp.abs(part.ky))
                       / part.d)
    t = spread + xp.abs(centre_slices) * phase[None, :]
    return part.s * np.sqrt(np.maximum(to_numpy((t * t) @ (part.mw * part.c * part.c)), 0.0))


def cell_lower_bounds(low_errors, delta, high_band: float):
    """``LB = (√E_L(R_c, o_c) − Δ)₊² + H`` for arrays of centre errors and Δ (see the module
    docstring): a lower bound of the true error of every pose of each cell."""
    root = np.sqrt(np.maximum(low_errors, 0.0))
    return np.maximum(root - delta, 0.0) ** 2 + high_band


def level_band(params: SearchParams, box_size: int, level: int) -> float:
    """Band limit (Fourier pixels) used for the exact part of the bound at ``level``."""
    if level >= params.last_level:
        return float(params.r_align)
    spacing = np.deg2rad(so3_grid.spacing_deg(level))
    band = params.band_fraction * box_size / (np.pi * max(params.particle_radius_px, 1.0)
                                              * spacing)
    return float(np.clip(band, params.min_band, params.r_align))


def _slices(reference_rfft, box_size, rotations, kx, ky):
    """Central slices at the band's pixels only: ``(N, M)`` complex128 on the reference's
    device; ``rotations`` host, ``kx``/``ky`` on the reference's device."""
    xp = array_module(reference_rfft)
    n = rotations.shape[0]
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


def level_cascade(params: SearchParams, box_size: int, first: int, last: int) -> dict:
    """The bands evaluated at each level, in order: band limits growing by ``band_ratio`` (√2:
    twice the pixels per step) up to :func:`level_band` of the level (``r_align`` at the last),
    starting one step below the previous level's band (or one step above it when that would
    fall below the first level's band). Each step adds only the ring of pixels between two
    limits (errors, and Δ², are sums over pixels), and candidates are pruned after every step."""
    out = {}
    prev = None
    for lvl in range(first, last + 1):
        end = level_band(params, box_size, lvl)
        bands = []
        if prev is not None and params.band_ratio > 1.0:
            band = prev / params.band_ratio
            if band <= level_band(params, box_size, first) * (1 + 1e-9):
                band = prev * params.band_ratio
            while band < end * (1 - 1e-9):
                bands.append(float(band))
                band *= params.band_ratio
        out[lvl] = bands + [float(end)]
        prev = end
    return out


def branch_and_bound(reference_rfft, data: ParticleData, params: SearchParams,
                     prior_rotation=None, prior_origin_px=None, envelope=None,
                     trace: bool = False) -> SearchResult:
    """Best pose of every particle in ``data`` against one reference (see the module docstring).

    ``prior_origin_px`` ``(B, 2)`` centres the shift grids (default 0); with ``params.local``,
    ``prior_rotation`` ``(B, 3, 3)`` restricts the search to the neighbourhood of each prior.
    Each level evaluates its candidates band by band (:func:`level_cascade`), pruning after
    every band. ``trace=True`` records, per particle, one dict per (level, band) step:
    ``level``, ``band`` (the band limit L, Fourier pixels), ``n_candidates``, ``n_kept``,
    ``n_pruned_bound`` / ``n_pruned_cap`` (candidates dropped by the bound / by the
    ``max_candidates`` cap), ``bounds`` (the cell lower bound LB of every candidate),
    ``true_errors`` (E_{r_align} at every candidate's centre, computed for the trace only),
    ``kept`` (bool mask of the candidates carried on: LB ≤ E* + posterior_window, at most
    ``max_candidates`` of them), ``margins`` (each candidate's cell term
    ``E_L(c) − (√E_L(c) − Δ)₊²``: how much a pose within the cell can gain in the low band),
    ``delta`` (Δ of every candidate), ``high_band`` (the high-band bound H), ``rotations`` and
    ``origins_px`` of the candidates, ``best_true`` (E*, the best true error of a last-level
    pose found so far) / ``best_bound`` (the lowest bound), ``evaluations`` (cumulative count,
    trace-only errors excluded) and, at the last step, ``final_errors`` (true errors of the
    survivors). Every bound is ≤ the true error of every pose of its cell with probability
    ≥ 1 − ε per pose (module docstring); that is what makes pruning safe.
    """
    box = data.box_size
    n = data.images_rfft.shape[0]
    env = amplitude_envelope(reference_rfft, box) if envelope is None else envelope
    first = params.first_level
    last = max(params.last_level, first)
    if params.local:
        first = params.local_level if params.local_level is not None else max(0, last - 1)
        first = min(first, last)
        if prior_rotation is None:
            raise ValueError("local search needs prior rotations")
    prior_origin_px = np.zeros((n, 2)) if prior_origin_px is None else np.asarray(prior_origin_px,
                                                                                   float)
    step_last = params.shift_step_px
    step0 = step_last * 2 ** (last - first)
    steps = {lvl: step0 / 2 ** (lvl - first) for lvl in range(first, last + 1)}
    if not params.coarse_shifts:  # every level searches the final shift grid (h_l = 0)
        steps = {lvl: step_last for lvl in steps}
    true_pixels = band_pixels(box, 0.0, params.r_align)
    m_true = int(true_pixels[0].size)
    cascade = level_cascade(params, box, first, last)
    if cascade[last][-1] < params.r_align:
        cascade[last].append(float(params.r_align))
    rings = {}  # (level, step) → (pixels of the ring [previous band, band), band)
    for lvl, bands in cascade.items():
        lo = 0.0
        for i, band in enumerate(bands):
            rings[lvl, i] = (band_pixels(box, lo, band), band)
            lo = band
    all_bands = sorted({band for bands in cascade.values() for band in bands})
    high = {band: search_high_band_bounds(data, env, band, params.r_align,
                                          params.failure_probability) for band in all_bands}
    spread_work = 0  # reference-side work of the cell bounds, shared by the batch
    cache = {key: _SpreadCache(key[0], last, int(px[0].size)) for key, (px, _) in rings.items()}

    shared = None
    if not params.local:
        d0, p0, r0 = asymmetric_cells(first, params.symmetry)
        shared = (d0, p0)

    out_rot = np.zeros((n, 3, 3))
    out_origin = np.zeros((n, 2))
    out_err = np.zeros(n)
    out_evals = np.zeros(n, dtype=np.int64)
    out_work = np.zeros(n, dtype=np.int64)
    certified = np.ones(n, dtype=bool)
    pruning = []
    traces = [] if trace else None
    candidates = []
    for b in range(n):
        p_true = _Particle(data, b, true_pixels)
        if params.local:
            dirs, psis = so3_grid.neighbourhood(first, np.asarray(prior_rotation[b]),
                                                params.local_psi_radius)
            offsets = so3_grid.shift_grid(step0, step0)
            if not params.coarse_shifts:
                offsets = so3_grid.shift_grid(2 * step0 - step_last, step_last)
        else:
            dirs, psis = shared
            offsets = so3_grid.shift_grid(params.max_shift_px, steps[first])
        # candidates are (rotation cell, origin) pairs; the first level takes all combinations
        n_rot = dirs.size
        pair_rot = np.repeat(np.arange(n_rot), offsets.shape[0])
        pair_origin = np.tile(prior_origin_px[b] + offsets, (n_rot, 1))
        evals = work = 0
        levels = []
        prune_levels = []
        best = (np.inf, None, None, None)  # E*, last-level direction, psi, origin
        for lvl in range(first, last + 1):
            err = np.zeros(pair_rot.size)
            delta2 = np.zeros(dirs.size)
            level_rotations = so3_grid.cell_rotations(lvl, dirs, psis)
            for step_i in range(len(cascade[lvl])):
                pixels, band = rings[lvl, step_i]
                part = _Particle(data, b, pixels)
                m_ring = int(pixels[0].size)
                if m_ring:
                    slices = _slices(reference_rfft, box, level_rotations, part.kx, part.ky)
                    spread, w_s = cache[lvl, step_i].get(reference_rfft, box, dirs, psis, slices,
                                                         part.kx, part.ky)
                    spread_work += w_s
                    delta2 += cell_deltas(part, spread, slices, steps[lvl] - step_last) ** 2
                    err += _pair_errors(part, slices, pair_rot, pair_origin)[0]
                evals += err.size
                work += err.size * m_ring
                delta = np.sqrt(delta2)[pair_rot]
                bound = cell_lower_bounds(err, delta, high[band][b])
                exact = lvl == last and band >= params.r_align
                if exact:  # the bound is the true error: E* is the best of them
                    i = int(np.argmin(err))
                    if err[i] < best[0]:
                        best = (float(err[i]), int(dirs[pair_rot[i]]), int(psis[pair_rot[i]]),
                                pair_origin[i].copy())
                elif best[1] is None or step_i == 0 or step_i == len(cascade[lvl]) - 1:
                    # E*: follow the lowest centre errors greedily down to the last level
                    top = np.argpartition(err, min(params.descents, err.size) - 1)[
                        :params.descents] if err.size > params.descents else np.arange(err.size)
                    for i in top[np.argsort(err[top], kind="stable")]:
                        e_g, d_g, p_g, o_g, n_g = _descend(reference_rfft, p_true, lvl, last,
                                                           dirs[pair_rot[i]], psis[pair_rot[i]],
                                                           pair_origin[i], steps)
                        evals += n_g
                        work += n_g * m_true
                        if e_g < best[0]:
                            best = (e_g, d_g, p_g, o_g)
                keep, by_bound, by_cap = _prune(bound, best[0], params)
                if by_cap:
                    certified[b] = False
                prune_levels.append((lvl, float(band), int(bound.size), int(by_bound),
                                     int(by_cap)))
                if trace:
                    levels.append(_trace_level(reference_rfft, p_true, lvl, dirs, psis,
                                               pair_rot, pair_origin, bound, keep, best[0],
                                               int(np.argmin(bound)), evals, band, err, delta,
                                               high[band][b], by_bound, by_cap))
                # carry the survivors (and only their rotations) to the next band
                alive = np.zeros(dirs.size, dtype=bool)
                alive[pair_rot[keep]] = True
                used = np.flatnonzero(alive)
                remap = np.cumsum(alive) - 1
                pair_rot, pair_origin, err = remap[pair_rot[keep]], pair_origin[keep], err[keep]
                dirs, psis, delta2 = dirs[used], psis[used], delta2[used]
                level_rotations = level_rotations[used]
            if lvl == last:
                # the survivors' true errors (and the greedy pose's) decide
                fd = np.concatenate([dirs[pair_rot], [best[1]]]).astype(np.int64)
                fp = np.concatenate([psis[pair_rot], [best[2]]]).astype(np.int64)
                fo = np.concatenate([pair_origin, np.asarray(best[3], float)[None, :]])
                fe = np.concatenate([err, [best[0]]])
                cells = fd * so3_grid.n_psi(lvl) + fp
                q = np.round(fo * 64.0).astype(np.int64) + (1 << 20)
                _, uniq = np.unique((cells << 42) + (q[:, 0] << 21) + q[:, 1], return_index=True)
                fd, fp, fo, true_err = fd[uniq], fp[uniq], fo[uniq], fe[uniq]
                order = np.argsort(true_err, kind="stable")
                near = order[true_err[order] <= true_err[order[0]] + params.posterior_window]
                rots = so3_grid.cell_rotations(lvl, fd[near], fp[near])
                candidates.append((rots, fo[near], true_err[near]))
                out_rot[b], out_origin[b], out_err[b] = rots[0], fo[near[0]], true_err[near[0]]
                if trace:
                    levels[-1]["final_errors"] = true_err
                break
            # children × the sub-shifts around each kept pair
            step = steps[lvl + 1]
            sub = so3_grid.shift_grid(step, step) if step < steps[lvl] else np.zeros((1, 2))
            owner, cd, cp = so3_grid.children_flat(lvl, dirs, psis)
            # pairs × children of their rotation × sub-shifts
            by_rot = np.argsort(owner, kind="stable")
            counts = np.bincount(owner, minlength=dirs.size)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            n_child = counts[pair_rot]
            pair_idx = np.repeat(np.arange(pair_rot.size), n_child)
            rank = np.arange(pair_idx.size) - np.repeat(np.cumsum(n_child) - n_child, n_child)
            child = by_rot[starts[pair_rot[pair_idx]] + rank]
            cd_all = np.repeat(cd[child], sub.shape[0])
            cp_all = np.repeat(cp[child], sub.shape[0])
            co_all = (pair_origin[pair_idx][:, None, :] + sub[None, :, :]).reshape(-1, 2)
            if sub.shape[0] == 1:
                # (child, origin) pairs are distinct already: the children of distinct cells
                # are distinct, and a pair's children keep its origin
                dirs, psis = cd, cp
                pair_rot, pair_origin = child, co_all
            else:
                cd_all, cp_all, pair_origin = _unique_pairs(lvl + 1, cd_all, cp_all, co_all)
                cell = cd_all * so3_grid.n_psi(lvl + 1) + cp_all
                uniq_cells, pair_rot = np.unique(cell, return_inverse=True)
                pair_rot = pair_rot.ravel()
                dirs = uniq_cells // so3_grid.n_psi(lvl + 1)
                psis = uniq_cells % so3_grid.n_psi(lvl + 1)
        out_evals[b] = evals
        out_work[b] = work
        pruning.append(prune_levels)
        if trace:
            traces.append(levels)
    out_work += int(np.ceil(spread_work / max(n, 1)))
    return SearchResult(out_rot, out_origin, out_err, out_evals, traces, candidates, certified,
                        out_work, pruning)


class _SpreadCache:
    """:func:`rotation_spread` rows of one level, kept across the particles of a call (dense
    while the level has ≤ 2·10⁷ cell × pixel entries, else recomputed per particle)."""

    def __init__(self, level, last, m):
        self.level, self.last, self.m = level, last, m
        self.rows = None
        self.dense = so3_grid.n_rotations(level) * m <= 20_000_000

    def get(self, reference_rfft, box, dirs, psis, slices, kx, ky):
        xp = array_module(slices)
        if self.level >= self.last:  # a last-level cell is a single pose: no spread
            return xp.zeros(slices.shape, dtype=xp.float64), 0
        if not self.dense:
            return rotation_spread(reference_rfft, box, self.level, self.last, dirs, psis,
                                   slices, kx, ky)
        if self.rows is None:
            self.rows = xp.zeros((so3_grid.n_rotations(self.level), self.m), dtype=xp.float64)
            self.done = np.zeros(so3_grid.n_rotations(self.level), dtype=bool)
        cell = np.asarray(dirs, np.int64) * so3_grid.n_psi(self.level) + np.asarray(psis)
        todo = np.flatnonzero(~self.done[cell])
        work = 0
        if todo.size:
            sp, work = rotation_spread(reference_rfft, box, self.level, self.last, dirs[todo],
                                       psis[todo], slices[xp.asarray(todo)], kx, ky)
            self.rows[xp.asarray(cell[todo])] = sp
            self.done[cell[todo]] = True
        return self.rows[xp.asarray(cell)], work


def _unique_pairs(level, d, p, origins):
    """(cell, origin) pairs with duplicates removed, sorted by cell (then origin)."""
    cell = np.asarray(d, np.int64) * so3_grid.n_psi(level) + np.asarray(p, np.int64)
    q = np.round(np.asarray(origins) * 64.0).astype(np.int64) + (1 << 20)
    key = (cell << 42) + (q[:, 0] << 21) + q[:, 1]
    _, first_of = np.unique(key, return_index=True)  # sorted by cell, then origin
    return (np.asarray(d, np.int64)[first_of], np.asarray(p, np.int64)[first_of],
            np.asarray(origins)[first_of])


def _descend(reference_rfft, p_true, level, last, direction, psi, origin, steps):
    """Follow one cell greedily to the last level: at each step the child × sub-shift with the
    lowest true error. Returns ``(error, direction, psi, origin, n_evaluations)`` of a
    last-level pose (an upper bound of the last-level optimum: the search's E*)."""
    d, p, o = int(direction), int(psi), np.asarray(origin, float)
    n_evals = 0
    if level == last:
        err, _ = p_true.errors(o[None, :], _slices(reference_rfft, p_true.d,
                                                   so3_grid.cell_rotations(level, [d], [p]),
                                                   p_true.kx, p_true.ky))
        return float(err[0, 0]), d, p, o, 1
    for lvl in range(level, last):
        cd, cp = so3_grid.children(lvl, [d], [p])
        cells = np.unique(cd.ravel() * so3_grid.n_psi(lvl + 1) + cp.ravel())
        cd, cp = cells // so3_grid.n_psi(lvl + 1), cells % so3_grid.n_psi(lvl + 1)
        sub = (so3_grid.shift_grid(steps[lvl + 1], steps[lvl + 1]) if steps[lvl + 1] < steps[lvl]
               else np.zeros((1, 2)))
        origins = o[None, :] + sub
        err, _ = p_true.errors(origins, _slices(reference_rfft, p_true.d,
                                                so3_grid.cell_rotations(lvl + 1, cd, cp),
                                                p_true.kx, p_true.ky))
        err = to_numpy(err)
        n_evals += err.size
        i, t = np.unravel_index(int(np.argmin(err)), err.shape)
        d, p, o = int(cd[i]), int(cp[i]), origins[t]
        e = float(err[i, t])
    return e, d, p, o, n_evals


def _trace_level(reference_rfft, p_true, lvl, dirs, psis, pair_rot, pair_origin, bound, keep,
                 e_star, star, evals, band, low_errors, delta, high_band, by_bound,
                 by_cap) -> dict:
    """One level of a search trace (see :func:`branch_and_bound`)."""
    rotations = so3_grid.cell_rotations(lvl, dirs, psis)
    true_slices = _slices(reference_rfft, p_true.d, rotations, p_true.kx, p_true.ky)
    true_errors, _ = _pair_errors(p_true, true_slices, pair_rot, pair_origin)
    kept = np.zeros(bound.size, dtype=bool)
    kept[keep] = True
    margins = np.maximum(low_errors, 0.0) - (bound - high_band)
    return dict(level=lvl, band=band, n_candidates=int(bound.size), n_kept=int(keep.size),
                n_pruned_bound=int(by_bound), n_pruned_cap=int(by_cap),
                bounds=bound.copy(), true_errors=true_errors, kept=kept, margins=margins,
                delta=np.asarray(delta).copy(), high_band=float(high_band),
                rotations=rotations[pair_rot], origins_px=pair_origin.copy(), best_true=e_star,
                best_bound=float(bound[star]), evaluations=int(evals))


def _pair_errors(part: _Particle, slices, pair_rot, pair_origin, chunk: int = 8192):
    """Errors of (rotation, origin) pairs: ``slices[pair_rot[i]]`` at ``pair_origin[i]``.

    Returns the errors and each pair's signal energy ``s²‖C Ŷ‖²_w`` in the band, as host
    arrays (the pruning that follows runs on the host); the GEMMs run on the slices' device,
    ``chunk`` rotations at a time (rotations × the distinct origins of their pairs).
    """
    xp = part.xp
    pair_rot = np.asarray(pair_rot)
    norm_x = float(xp.sum(part.mw * xp.abs(part.x) ** 2))
    err = np.empty(pair_rot.size)
    energy = np.empty(pair_rot.size)
    chunk_id = pair_rot // chunk
    if pair_rot.size < 2 or np.all(chunk_id[1:] >= chunk_id[:-1]):
        order = np.arange(pair_rot.size)
    else:
        # small integers: numpy's stable sort is a linear-time radix sort for ≤ 16 bits
        order = np.argsort(chunk_id.astype(np.uint16 if chunk_id.max() < 2 ** 16 else np.int64),
                           kind="stable")
    bounds = np.searchsorted(chunk_id[order], np.arange(0, slices.shape[0] // chunk + 2))
    for c in range(bounds.size - 1):
        idx = order[bounds[c]:bounds[c + 1]]
        if idx.size == 0:
            continue
        r0 = c * chunk
        cy = slices[r0:r0 + chunk] * (part.s * part.c)[None, :]
        energy_rot = (xp.abs(cy) ** 2) @ part.mw
        # origins lie on a lattice of ≥ 1/64 px: distinct origins by a table, not a sort
        q = np.round(pair_origin[idx] * 64.0).astype(np.int64)
        q -= q.min(axis=0)
        span = int(q[:, 1].max()) + 1
        key = q[:, 0] * span + q[:, 1]
        if int(key.max()) < 1 << 22:
            seen = np.full(int(key.max()) + 1, -1, dtype=np.int64)
            seen[key[::-1]] = np.arange(key.size)[::-1]  # first occurrence of every key
            present = np.flatnonzero(seen >= 0)
            first_of = seen[present]
            lookup = np.zeros(seen.size, dtype=np.int64)
            lookup[present] = np.arange(present.size)
            inverse = lookup[key]
        else:
            _, first_of, inverse = np.unique(key, return_index=True, return_inverse=True)
        xs = part.shifted(pair_origin[idx][first_of]) * part.mw[None, :]  # (U, M)
        cross = (cy.conj() @ xs.T).real  # (rotations, U): one GEMM, then pick the pairs
        rot_d = xp.asarray(pair_rot[idx] - r0)
        origin_d = xp.asarray(inverse.ravel())
        err[idx] = to_numpy(norm_x + energy_rot[rot_d] - 2.0 * cross[rot_d, origin_d])
        energy[idx] = to_numpy(energy_rot[rot_d])
    return err, energy


def _prune(bound, e_star, params: SearchParams):
    """Candidates to carry on: those with ``bound ≤ e_star + posterior_window``, at most
    ``max_candidates`` (the lowest bounds). Returns ``(indices, n_pruned_by_bound,
    n_pruned_by_cap)``."""
    keep = np.flatnonzero(bound <= e_star + params.posterior_window)
    if keep.size == 0:  # (only when E* is unknown or the bound failed) keep the best
        keep = np.array([int(np.argmin(bound))])
    by_bound = bound.size - keep.size
    by_cap = 0
    if keep.size > params.max_candidates:
        by_cap = keep.size - params.max_candidates
        part = np.argpartition(bound[keep], params.max_candidates - 1)[: params.max_candidates]
        keep = np.sort(keep[part])
    return keep, by_bound, by_cap


def reachable_origins(params: SearchParams) -> np.ndarray:
    """Every origin offset (around the prior) that :func:`branch_and_bound` can return."""
    first = params.first_level
    last = max(params.last_level, first)
    if not params.coarse_shifts:
        return so3_grid.shift_grid(params.max_shift_px, params.shift_step_px)
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
        slices = _slices(reference_rfft, box, r, pixels[1], pixels[2])
        for b, part in enumerate(parts):
            origins = prior_origin_px[b][None, :] + offsets
            err, _ = part.errors(origins, slices)
            flat = int(err.argmin())
            i, t = np.unravel_index(flat, err.shape)
            e = float(err.ravel()[flat])
            if e < best[b]:
                best[b], best_rot[b], best_origin[b] = e, r[i], origins[t]
    evals = np.full(n, rots.shape[0] * offsets.shape[0], dtype=np.int64)
    return SearchResult(best_rot, best_origin, best, evals, certified=np.ones(n, dtype=bool),
                        n_pixel_evaluations=evals * int(pixels[0].size))


def pose_error(reference_rfft, data: ParticleData, rotations, origins_px, r_align: float):
    """True errors ``(B,)`` of given poses (same definition as the search)."""
    pixels = band_pixels(data.box_size, 0.0, r_align)
    out = np.zeros(data.images_rfft.shape[0])
    for b in range(out.size):
        part = _Particle(data, b, pixels)
        err, _ = part.errors(np.asarray(origins_px[b], float)[None, :],
                             _slices(reference_rfft, data.box_size, rotations[b:b + 1],
                                     part.kx, part.ky))
        out[b] = float(err[0, 0])
    return out
