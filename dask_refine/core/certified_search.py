"""A certified branch and bound over the finest pose grid: a bound over whole cells, pruning by
that bound alone, and a flag saying when a particle's result is the grid optimum.

The domain is what :func:`.pose_search.exhaustive_search` scans: every rotation cell of
``params.last_level`` (the *finest* grid, in the symmetry's asymmetric unit) × every origin
:func:`.pose_search.reachable_origins` gives. Errors are the search's (docs/design-notes.md,
"Pose search"; the derivation and measurements: "Certified branch and bound"):
``E(p) = ‖X_t − S_p‖²_w``, ``S_p = s C Ŷ(R_p)`` the scaled, CTF-modulated slice of the
reference, ``X_t`` the image translated by the candidate origin ``t``, ``‖·‖²_w = Σ m_k w_k |·|²``
over the centred-rfft pixels with ``|k| < r_align`` (``m`` the Hermitian multiplicity,
``w = 1/σ²``).

**The bound.** A candidate is a pair (cell ``c`` of level ℓ, origin ``t``); its descendants are
the finest cells ``d ∈ D(c)`` (the children rule makes them partition the finest grid, every
finest cell reachable from exactly one cell of each level). With a band limit ``L``, ``E`` splits
into ``E_L + E_H`` (``H = [L, r_align)``) and, for every ``d ∈ D(c)``,

    E(d, t) = E_L(c, t) + e_L(d) − e_L(c) − 2 Re⟨X_t, Δ_d⟩_L + ‖X_H‖² + e_H(d) − 2 Re⟨X_t, S_d⟩_H

with ``Δ_d = S_d − S_c`` on the band and ``e_B(p) = ‖S_p‖²_B``. Only ``E_L(c, t)`` needs the
candidate's projection; everything else is one vector per particle over the finest grid
(precomputed tables of the reference's slices). The image is then written as the model the
error is the likelihood of: ``X_t = A_t + N_t`` with ``A_t`` a scaled, CTF-modulated slice of
the reference at some grid pose (so ``‖A_t‖²_B ≤ P_B = max_p e_B(p)``) and ``N`` Gaussian noise
with the estimated σ². Then, for the pair's descendants:

* signal, high band: ``e_H(d) − 2 Re⟨A, S_d⟩_H ≥ e_H(d) − 2 √(P_H e_H(d))`` (Cauchy–Schwarz);
* signal, low band: split ``Δ_d = β_d u + Δ⊥_d`` along ``u = S_c/‖S_c‖``; the data fix ``A``'s
  component ``a = Re⟨A, u⟩`` to within ``τ`` of ``a_obs = Re⟨X_t, u⟩`` (the noise in it is
  standard normal), and ``‖A − a u‖ ≤ √(P_L − a²)``, so
  ``Re⟨A, Δ_d⟩ ≤ max_{|a − a_obs| ≤ τ} a β_d + √(P_L − a²) ‖Δ⊥_d‖`` (a concave maximum; plain
  Cauchy–Schwarz ``√P_L ‖Δ_d‖`` when the interval holds its unconstrained argmax);
* noise: ``−2 Re⟨N_t, G_d⟩`` with ``G_d = (Δ_d on L, S_d on H)`` is Gaussian with standard
  deviation ``2 ‖G_d‖_w``, so ``≥ −2τ ‖G_d‖_w``.

With ``τ = Φ⁻¹(1 − ε)``, ``LB(c, t)`` is ``E_L(c, t) + ‖X_H‖²`` plus the minimum over
``d ∈ D(c)`` of the sum of these terms and ``e_L(d) − e_L(c)``. For a given ``(d, t)`` it is below
``E(d, t)`` unless one of three Gaussian events of probability ε happens, **under that model**
(the noise model the search's likelihood assumes; a reference too weak at high resolution or
a noise model off by a factor makes it an approximation, as for cryoSPARC's bound, Punjani et
al. 2017, Suppl. Note 2). At the finest level ``Δ = 0`` (two events); with ``L = r_align`` the
bound is the error itself.

**What is certified.** The probability statements are about a fixed pose; the one that matters
is the true pose ``p*`` of the model. If the bound holds at ``(ancestor of p*, t*)`` at every
step of the search (each coarser level's bands, then each band of the finest level's cascade),
``p*`` is never pruned and the result scores at least as well as the true pose: that fails
with probability at most ``3 · n_steps · ε`` (a union bound; ``n_steps`` is 5 with the
defaults, so ≤ 1.5% at ε = 10⁻³). The grid optimum ``p°`` is returned whenever the bound holds
at its own ancestors; ``p°`` is chosen by the noise, so that is measured rather than proved
(``benchmarks/pose_search.py``: recall against the exhaustive search). Nothing else is
assumed: no candidate is dropped except by its bound (``LB > E* + window``, ``E*`` the best true
error found so far, from the true errors of the finest descendants of each step's lowest
bounds), unless the candidates exceed
``max_pairs`` — the safety valve — when the lowest bounds are kept and the particle's
``certified`` flag is False.

**Work.** The finest level is evaluated band by band (each step adds one ring of pixels to the
candidates' running cross terms), so a candidate pruned at a low band never touches the high
one. ``SearchResult.pixel_work`` counts every Fourier pixel × candidate the search touches,
the per-particle table products (``e_B``, ``⟨S_d, S_c⟩``) and the incumbents' true errors; the
reference-side tables (the finest grid's slices, shared by a batch) are split over it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from . import so3_grid
from .backend import to_numpy
from .fourier import rfft_frequencies, rfft_multiplicity
from .pose_search import (ParticleData, SearchParams, SearchResult, _pair_errors, _Particle,
                          _slices, asymmetric_cells, band_pixels, level_band, reachable_origins)

try:  # the pair kernel; NumPy fallback below
    import numba
except ImportError:  # pragma: no cover
    numba = None

#: candidates of each coarser level whose finest descendants' true errors update the incumbent
INCUMBENT_PAIRS = 16
#: width (Fourier pixels) of the rings whose energies are bounded rather than computed
RING_WIDTH_PX = 0.25
#: default failure probability of the bound per evaluation (see the module docstring)
DEFAULT_EPSILON = 1e-3


@dataclass(frozen=True)
class BoundSettings:
    """Settings of the certified search.

    ``epsilon``: the bound's failure probability per evaluation under the noise model;
    ``max_pairs``: the safety valve (candidates kept at any step; beyond it the lowest bounds
    are kept and the particle is not certified); ``level_bands``: for each coarser level (first
    to last − 1) a band limit or a tuple of increasing band limits it climbs through (Fourier
    pixels; an empty tuple expands the level without evaluating it); ``cascade``: the band
    limits the finest level climbs through before ``r_align``, default from the last band of the
    level before it, × √2 per step.

    Default: only the level before the finest is evaluated (coarser cells are too large for
    the bound to prune: level 2 pruned 0.02–0.1% of its pairs at box 64), climbing quarter
    octaves from the search's band (:func:`.pose_search.level_band`) ÷ √2 to × √2: its
    survivors have 8 children each, so another band there costs less than the children's
    first, and each band is only the ring it adds (the cross terms and the table products
    accumulate). Chosen on the first 16 particles of ``benchmarks/pose_search.py`` (7pbl, box
    64, SNR 0.05; docs/benchmarks.md, "Certified branch and bound"): work ratio 9.4 with
    (6.1, 7.2), 10.4 with (6.1, 7.2, 8.6), 11.1 with (4.3 … 8.6).
    """

    epsilon: float = DEFAULT_EPSILON
    max_pairs: int = 20_000_000
    level_bands: tuple | None = None
    cascade: tuple | None = None


class GridTables:
    """The reference's side of the search, shared by a batch: pixels sorted by radius, the
    finest cells and their ancestors, the finest grid's slices ``(n_finest, M)`` complex64 on
    the band ``|k| < r_align`` (pixels sorted by radius, so a band is a prefix), their powers
    ``(n_finest, M)`` float32, each coarser level's cell centres' slices ``(n_ℓ, M_ℓ)`` and the
    per-pixel overlaps ``Re(conj(Ŷ_d) Ŷ_c)`` ``(n_finest, M_ℓ)`` float32 of every finest cell's
    slice with its ancestor's centre (the cell term's ``β_d`` and ``‖Δ_d‖``)."""

    def __init__(self, reference_rfft, box_size: int, params: SearchParams,
                 settings: BoundSettings = BoundSettings()):
        self.box = box_size
        self.first = params.first_level
        self.last = max(params.last_level, params.first_level)
        self.steps, self.cascade = search_steps(params, settings, box_size)
        ky, kx = np.broadcast_arrays(*rfft_frequencies(box_size, 2))
        radius = np.sqrt(kx * kx + ky * ky).ravel()
        sel = np.flatnonzero(radius < params.r_align)
        order = np.argsort(radius[sel], kind="stable")
        self.pixels = sel[order]
        self.radius = radius[self.pixels]
        self.kx = kx.ravel()[self.pixels].astype(np.float64)
        self.ky = ky.ravel()[self.pixels].astype(np.float64)
        self.mult = np.broadcast_to(rfft_multiplicity(box_size, 2), ky.shape).ravel()[
            self.pixels].astype(np.float64)
        self.anc, self.cells, self.parent = _ancestry(self.first, self.last, params.symmetry)
        self.children = {}
        for lvl in range(self.first, self.last):
            order = np.argsort(self.parent[lvl + 1], kind="stable")
            start = np.searchsorted(self.parent[lvl + 1][order], np.arange(
                self.cells[lvl][0].size + 1))
            self.children[lvl] = (start, order)
        reference = self.reference = to_numpy(reference_rfft)
        fd, fp = self.cells[self.last]
        rots = so3_grid.cell_rotations(self.last, fd, fp)
        self.finest = np.empty((rots.shape[0], self.pixels.size), np.complex64)
        for start in range(0, rots.shape[0], 16384):
            self.finest[start:start + 16384] = _slices(reference, box_size,
                                                       rots[start:start + 16384], self.kx, self.ky)
        self.finest_power = (self.finest.real ** 2 + self.finest.imag ** 2).astype(np.float32)
        self.centres, self.overlap, self.members = {}, {}, {}
        for lvl in range(self.first, self.last):
            if not self.steps[lvl]:  # a level expanded without evaluation
                continue
            m = self.n_pixels(max(self.steps[lvl]))
            d, p = self.cells[lvl]
            centre = _slices(reference, box_size, so3_grid.cell_rotations(lvl, d, p),
                             self.kx[:m], self.ky[:m])
            self.centres[lvl] = centre
            near = centre[self.anc[lvl]]
            f = self.finest[:, :m]
            self.overlap[lvl] = (f.real * near.real + f.imag * near.imag).astype(np.float32)
            order = np.argsort(self.anc[lvl], kind="stable")
            self.members[lvl] = (np.searchsorted(self.anc[lvl][order], np.arange(d.size + 1)),
                                 order)
        self.n_finest = rots.shape[0]
        # beyond the coarser levels' last band, energies come from half-pixel rings (per
        # particle an interval: the ring's largest and smallest q, see :class:`_Energies`)
        self.m_exact = max([self.n_pixels(max(b)) for b in self.steps.values() if b] or [0])
        edges = {self.n_pixels(b) for b in np.arange(
            self.radius[self.m_exact] if self.m_exact < self.pixels.size else params.r_align,
            params.r_align, RING_WIDTH_PX)} | {self.n_pixels(b) for b in self.cascade} | {
            self.m_exact, self.pixels.size}
        self.ring_edges = np.array(sorted(e for e in edges if e >= self.m_exact))
        self.ring_power = np.stack(
            [self.finest_power[:, a:b].sum(axis=1) for a, b in
             zip(self.ring_edges[:-1], self.ring_edges[1:])], axis=1) if self.ring_edges.size > 1 \
            else np.zeros((self.n_finest, 0), np.float32)
        self.reference_work = float(self.n_finest) * self.pixels.size + sum(
            c.size for c in self.centres.values())

    def n_pixels(self, band: float) -> int:
        """How many of the sorted pixels have ``|k| < band``."""
        return int(np.searchsorted(self.radius, band, side="left"))

    def rotations(self, level: int, index) -> np.ndarray:
        d, p = self.cells[level]
        return so3_grid.cell_rotations(level, d[index], p[index])


@functools.lru_cache(maxsize=4)
def _ancestry(first: int, last: int, symmetry: str):
    """``(anc, cells, parent)``: ``cells[ℓ] = (directions, psis)`` of the cells of level ℓ that
    are ancestors of the finest cells in the asymmetric unit (all of them for C1),
    ``anc[ℓ] (n_finest,)`` the index in ``cells[ℓ]`` of each finest cell's ancestor and
    ``parent[ℓ] (n_ℓ,)`` the index in ``cells[ℓ − 1]`` of each level-ℓ cell's parent."""
    fd, fp, _ = asymmetric_cells(last, symmetry)
    cells = {last: (fd, fp)}
    anc, parent = {}, {}
    owner_d, owner_p = fd, fp
    to_prev = np.arange(fd.size)
    for lvl in range(last, first, -1):
        pd_, pp = so3_grid.parent_cells(lvl, owner_d, owner_p)
        key = pd_.astype(np.int64) * so3_grid.n_psi(lvl - 1) + pp
        uniq, inv = np.unique(key, return_inverse=True)
        parent[lvl] = inv.ravel()
        to_prev = inv.ravel()[to_prev]
        anc[lvl - 1] = to_prev
        owner_d, owner_p = uniq // so3_grid.n_psi(lvl - 1), uniq % so3_grid.n_psi(lvl - 1)
        cells[lvl - 1] = (owner_d, owner_p)
    return anc, cells, parent


if numba is not None:
    @numba.njit(nogil=True, cache=True)
    def _pair_cross(slices, shifted, cell, origin, m0, m1, out):
        """``out[p] += Re Σ_{k∈[m0,m1)} conj(slices[cell[p], k]) · shifted[origin[p], k]``."""
        for p in range(cell.size):
            c, t = cell[p], origin[p]
            acc = 0.0
            for k in range(m0, m1):
                a = slices[c, k]
                b = shifted[t, k]
                acc += a.real * b.real + a.imag * b.imag
            out[p] += acc
else:  # pragma: no cover
    def _pair_cross(slices, shifted, cell, origin, m0, m1, out):
        for start in range(0, cell.size, 65536):
            sl = slice(start, start + 65536)
            out[sl] += np.sum((slices[cell[sl], m0:m1].conj()
                               * shifted[origin[sl], m0:m1]).real, axis=1)


def _cell_term_numpy(cell, a_obs, start, members, base, beta, gamma, p_l, tau, out):
    """For each pair: ``min_{d ∈ D(cell)} base_d − 2 max_{a} (a β_d + √(P_L − a²) γ_d)``, the
    signal's component ``a`` along ``u`` within ``τ`` of ``a_obs`` (and ``|a| ≤ √P_L``)."""
    root = np.sqrt(p_l)
    for i in range(cell.size):
        c = cell[i]
        lo = max(a_obs[i] - tau, -root)
        hi = min(a_obs[i] + tau, root)
        if lo > hi:  # the observation is incompatible with |a| ≤ √P_L: take the whole range
            lo, hi = -root, root
        best = np.inf
        for j in range(start[c], start[c + 1]):
            d = members[j]
            bt, gm = beta[d], gamma[d]
            norm = np.sqrt(bt * bt + gm * gm)
            a = root * bt / norm if norm > 0.0 else 0.0
            a = min(max(a, lo), hi)
            val = base[d] - 2.0 * (a * bt + np.sqrt(max(p_l - a * a, 0.0)) * gm)
            if val < best:
                best = val
        out[i] = best


_cell_terms = numba.njit(nogil=True, cache=True)(_cell_term_numpy) if numba is not None \
    else _cell_term_numpy


def certified_search(reference_rfft, data: ParticleData, params: SearchParams,
                     settings: BoundSettings = BoundSettings(), prior_origin_px=None,
                     tables: GridTables | None = None) -> SearchResult:
    """The finest-grid optimum of every particle in ``data`` (see the module docstring), with
    ``certified (B,)`` (no safety valve fired), ``pixel_work (B,)`` and ``pruning (B, steps,
    3)``: per step (each coarser level, then each band of the finest level) the candidates,
    those pruned by the bound and those dropped by the valve. ``candidates`` as in
    :func:`.pose_search.branch_and_bound` (every finest pose within ``params.posterior_window``
    of the best). Global searches only (``params.local`` is refused); host arrays."""
    if params.local:
        raise ValueError("certified_search is global; local searches use branch_and_bound")
    if data.slice_matrix is not None:  # its tables are built at the grid's own rotations
        raise ValueError("certified_search does not model anisotropic magnification; "
                         "branch_and_bound does")
    box = data.box_size
    n = data.images_rfft.shape[0]
    first, last = params.first_level, max(params.last_level, params.first_level)
    if tables is None:
        tables = GridTables(reference_rfft, box, params, settings)
    level_steps, cascade = tables.steps, tables.cascade
    tau = float(ndtri(1.0 - settings.epsilon))
    prior = np.zeros((n, 2)) if prior_origin_px is None else np.asarray(prior_origin_px, float)
    offsets = reachable_origins(params)
    n_steps = sum(len(level_steps[lvl]) for lvl in range(first, last)) + len(cascade)
    out = SearchResult(np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros(n),
                       np.zeros(n, np.int64), candidates=[],
                       pruning=np.zeros((n, n_steps, 3), np.int64), certified=np.ones(n, bool),
                       pixel_work=np.full(n, tables.reference_work / n))
    for b in range(n):
        _search_one(tables, data, b, prior[b] + offsets, params, level_steps, cascade, tau,
                    settings.max_pairs, out)
    return out


class _Energies:
    """A particle's slice energies ``e_B(d) = Σ_{k∈B} q_k |Ŷ_{d,k}|²`` over the finest grid:
    exact for the bands ``|k| < b`` up to the coarser levels' last band (one product per ring
    of the table), and for the rest of the band an interval per finest cell from the rings'
    powers and each ring's extreme ``q`` (the CTF oscillates within a ring); exact energies of
    given cells on demand. ``work`` counts the pixel products made."""

    def __init__(self, tables: GridTables, q, prefixes):
        self.tables, self.q = tables, q
        self.low, self._overlap = {}, {}
        acc = np.zeros(tables.n_finest)
        prev = 0
        for m in sorted(set(prefixes) | {tables.m_exact}):
            if m > tables.m_exact:
                continue
            acc = acc + tables.finest_power[:, prev:m] @ q[prev:m].astype(np.float32)
            self.low[m] = acc.copy()
            prev = m
        edges = tables.ring_edges
        q_hi = np.array([q[a:b].max() for a, b in zip(edges[:-1], edges[1:])])
        q_lo = np.array([q[a:b].min() for a, b in zip(edges[:-1], edges[1:])])
        ring_hi = tables.ring_power * q_hi.astype(np.float32)
        ring_lo = tables.ring_power * q_lo.astype(np.float32)
        # tail sums: bounds of the energy from ring edge j to the end of the band
        self.tail_hi = np.cumsum(ring_hi[:, ::-1], axis=1)[:, ::-1]
        self.tail_lo = np.cumsum(ring_lo[:, ::-1], axis=1)[:, ::-1]
        self.work = float(tables.n_finest) * (tables.m_exact + 2 * (edges.size - 1))

    def high(self, m: int):
        """``(lo, hi)`` ``(n_finest,)``: bounds of ``e_{[m, end)}`` for every finest cell."""
        t = self.tables
        if m >= t.pixels.size:
            zero = np.zeros(t.n_finest)
            return zero, zero
        if m <= t.m_exact:
            mid = self.low[t.m_exact] - self.low[m]
            if t.ring_edges.size < 2:
                return mid, mid
            return mid + self.tail_lo[:, 0], mid + self.tail_hi[:, 0]
        j = int(np.searchsorted(t.ring_edges, m))
        if j >= t.ring_edges.size - 1:
            zero = np.zeros(t.n_finest)
            return zero, zero
        return self.tail_lo[:, j], self.tail_hi[:, j]

    def overlap(self, level: int, m: int) -> np.ndarray:
        """``⟨S_d, S_c⟩`` on the first ``m`` pixels for every finest cell and its ancestor's
        centre at ``level``, accumulated ring by ring over the level's bands."""
        prev, acc = self._overlap.get(level, (0, np.zeros(self.tables.n_finest)))
        if m > prev:
            acc = acc + self.tables.overlap[level][:, prev:m] @ self.q[prev:m].astype(np.float32)
            self.work += float(self.tables.n_finest) * (m - prev)
            self._overlap[level] = (m, acc)
        return acc

    def exact(self, cells, m: int) -> np.ndarray:
        """Exact ``e_{|k|<band}`` of finest ``cells`` on the first ``m`` pixels."""
        if m <= self.tables.m_exact and m in self.low:
            return self.low[m][cells]
        self.work += float(cells.size) * m
        return self.tables.finest_power[cells, :m] @ self.q[:m].astype(np.float32)


def _high_band_terms(lo, hi, tau: float, extra2=0.0):
    """The worst, over ``e_H ∈ [lo, hi]``, of ``e_H − 2√(P_H e_H) − 2τ√(extra2 + e_H)``, with
    ``P_H = max hi`` (the first part is convex with its minimum at ``P_H``)."""
    p_h = float(hi.max()) if hi.size else 0.0
    e = np.clip(p_h, lo, hi)
    return e - 2.0 * np.sqrt(p_h * e) - 2.0 * tau * np.sqrt(extra2 + hi)


def search_steps(params: SearchParams, settings: BoundSettings, box_size: int):
    """``(steps, cascade)``: the band limits each coarser level climbs through (``{level:
    tuple}``) and those of the finest level, ending at ``r_align`` (see :class:`BoundSettings`)."""
    first, last = params.first_level, max(params.last_level, params.first_level)
    if settings.level_bands:
        steps = {lvl: tuple(float(b) for b in np.atleast_1d(settings.level_bands[lvl - first]))
                 for lvl in range(first, last)}
    else:
        # levels above the one before the finest are expanded without evaluation (their cells
        # are too large for the bound to prune: level 2 pruned 0.02–0.1% of its pairs at box 64)
        steps = {lvl: () for lvl in range(first, last - 1)}
        if last > first:
            band = level_band(params, box_size, last - 1)
            steps[last - 1] = tuple(sorted({min(band * 2 ** (j / 4), params.r_align)
                                            for j in range(-2, 3)}))
    if settings.cascade:
        cascade = [float(b) for b in settings.cascade]
    else:
        band = (max(steps[last - 1]) if last > first and steps[last - 1]
                else level_band(params, box_size, last))
        cascade = []
        while band < params.r_align:
            cascade.append(band)
            band *= np.sqrt(2.0)
    return steps, [b for b in cascade if b < params.r_align] + [params.r_align]


def _search_one(tables: GridTables, data: ParticleData, b: int, origins, params: SearchParams,
                level_steps: dict, cascade: list, tau: float, max_pairs: int,
                out: SearchResult) -> None:
    first, last = tables.first, tables.last
    xp_img = to_numpy(data.images_rfft[b]).ravel()[tables.pixels].astype(np.complex128)
    ctf = to_numpy(data.ctf[b]).ravel()[tables.pixels].astype(np.float64)
    mw = tables.mult * to_numpy(data.noise_weight).ravel()[tables.pixels].astype(np.float64)
    s = float(np.asarray(data.scale)[b])
    sc = s * ctf
    q = sc * sc * mw  # e_B(p) = Σ_B q |Ŷ_p|²
    phase = (-2j * np.pi / tables.box) * (np.outer(origins[:, 0], tables.kx)
                                          + np.outer(origins[:, 1], tables.ky))
    shifted = xp_img[None, :] * np.exp(phase) * (mw * sc)[None, :]  # ⟨·, S⟩ = Re Σ conj(Ŷ)·this
    norm_cum = np.concatenate([[0.0], np.cumsum(mw * np.abs(xp_img) ** 2)])
    m_full = tables.pixels.size
    norm_x = norm_cum[m_full]
    margin = 1e-6 * norm_x  # float32 tables
    prefixes = {tables.n_pixels(b_) for steps in level_steps.values() for b_ in steps} | {
        tables.n_pixels(c) for c in cascade}
    energy = _Energies(tables, q, prefixes)
    work = 0.0
    window = params.posterior_window
    e_star, star = np.inf, None  # the incumbent: the best true error seen, and its pair
    n_t = origins.shape[0]
    step = 0
    certified = True
    cell = np.repeat(np.arange(tables.cells[first][0].size, dtype=np.int64), n_t)
    origin = np.tile(np.arange(n_t, dtype=np.int64), tables.cells[first][0].size)
    for lvl in range(first, last):
        cross = np.zeros(cell.size)
        m_prev = 0
        for band in level_steps[lvl]:
            m = tables.n_pixels(band)
            _pair_cross(tables.centres[lvl], shifted, cell, origin, m_prev, m, cross)
            work += float(cell.size) * (m - m_prev)
            bound = _cell_bounds(tables, lvl, m, q, energy, tau, cell, cross, norm_cum[m],
                                 norm_x) - margin
            if cell.size == 0:
                break
            # a better incumbent: the true errors of the finest descendants of the lowest bounds
            top = (np.argpartition(bound, INCUMBENT_PAIRS)[:INCUMBENT_PAIRS]
                   if bound.size > INCUMBENT_PAIRS else np.arange(bound.size))
            fine, fine_origin = _descendant_pairs(tables, lvl, cell[top], origin[top])
            fine_cross = np.zeros(fine.size)
            _pair_cross(tables.finest, shifted, fine, fine_origin, 0, m_full, fine_cross)
            work += float(fine.size) * m_full
            fine_err = norm_x + energy.exact(fine, m_full) - 2.0 * fine_cross
            j = int(np.argmin(fine_err))
            if fine_err[j] + margin < e_star:
                e_star, star = float(fine_err[j]) + margin, (fine[j], fine_origin[j])
            keep, certified = _keep(bound, e_star + window, max_pairs, out.pruning[b, step],
                                    certified)
            step += 1
            cell, origin, cross = cell[keep], origin[keep], cross[keep]
            m_prev = m
        cell, origin = _children_pairs(tables, lvl, cell, origin)
    # the finest level: bands climb to r_align, each step adding one ring to the cross terms
    slices = tables.finest
    cross = np.zeros(cell.size)
    m_prev = 0
    for band in cascade:
        m = tables.n_pixels(band) if band < params.r_align else m_full
        _pair_cross(slices, shifted, cell, origin, m_prev, m, cross)
        work += float(cell.size) * (m - m_prev)
        err_l = norm_cum[m] + energy.exact(cell, m) - 2.0 * cross
        bound = _finest_bounds(energy, m, tau, cell, err_l, norm_cum[m], norm_x)
        if m < m_full:
            bound -= margin
        if m == m_full and bound.size:
            e_star = min(e_star, float(bound.min()))
        keep, certified = _keep(bound, e_star + window + (margin if m == m_full else 0.0),
                                max_pairs, out.pruning[b, step], certified)
        step += 1
        cell, origin, cross = cell[keep], origin[keep], cross[keep]
        m_prev = m
    out.n_evaluations[b] = int(out.pruning[b, :, 0].sum())
    out.certified[b] = certified
    out.pixel_work[b] += work + energy.work
    if cell.size == 0:  # the valve dropped every pose as good as the incumbent: return it
        cell, origin = np.array([star[0]]), np.array([star[1]])
    # the survivors' true errors, exactly as the exhaustive search computes them
    err = _exact_errors(tables, data, b, cell, origins[origin], params.r_align)
    order = np.argsort(err, kind="stable")
    near = order[err[order] <= err[order[0]] + window]
    rots = tables.rotations(last, cell[near])
    out.candidates.append((rots, origins[origin[near]], err[near]))
    out.rotation[b], out.origin_px[b], out.error[b] = rots[0], origins[origin[near[0]]], \
        err[near[0]]
    out.pixel_work[b] += float(cell.size) * m_full


def _cell_bounds(tables: GridTables, level: int, m: int, q, energy: "_Energies", tau: float, cell,
                 cross, norm_low: float, norm_x: float) -> np.ndarray:
    """``LB(c, t)`` of the module docstring for pairs (``cell`` of ``level``, origin) whose cross
    terms ``Re⟨X_t, S_c⟩`` on the band's ``m`` pixels are ``cross``; ``norm_low`` = ``‖X‖²`` on
    the band, ``norm_x`` on the whole band."""
    e_l = energy.low[m]
    lo, hi = energy.high(m)
    p_l = float(e_l.max())
    anc = tables.anc[level]
    centre = tables.centres[level][:, :m]
    e_c = (centre.real ** 2 + centre.imag ** 2) @ q[:m]
    norm_c = np.sqrt(np.maximum(e_c, 1e-300))
    # per descendant d of its cell c: Δ_d = S_d − S_c split along u = S_c/‖S_c‖
    # (β_d = ⟨Δ_d, u⟩) and across it (γ_d = ‖Δ_d − β_d u‖)
    overlap = energy.overlap(level, m)
    beta = (overlap - e_c[anc]) / norm_c[anc]
    delta2 = np.maximum(e_l + e_c[anc] - 2.0 * overlap, 0.0)
    gamma = np.sqrt(np.maximum(delta2 - beta * beta, 0.0))
    base = e_l - e_c[anc] + _high_band_terms(lo, hi, tau, delta2)
    start, members = tables.members[level]
    worst = np.empty(cell.size)
    _cell_terms(cell, cross / norm_c[cell], start, members, base, beta, gamma, p_l, tau, worst)
    return norm_low + e_c[cell] - 2.0 * cross + (norm_x - norm_low) + worst


def _finest_bounds(energy: "_Energies", m: int, tau: float, cell, err_low, norm_low: float,
                   norm_x: float) -> np.ndarray:
    """``LB(d, t)`` at the finest level (``Δ = 0``): the pairs' exact errors ``err_low`` on the
    band's ``m`` pixels plus the bound of the rest, ``‖X_H‖² + e_H − 2√(P_H e_H) − 2τ√e_H``
    (``e_H`` within its interval)."""
    if m >= energy.tables.pixels.size:
        return err_low
    lo, hi = energy.high(m)
    return err_low + (norm_x - norm_low) + _high_band_terms(lo, hi, tau)[cell]


def _keep(bound, threshold: float, max_pairs: int, row, certified: bool):
    """Indices of the candidates whose bound is ≤ ``threshold`` (at most ``max_pairs``: the
    lowest bounds; then the particle is not certified); fills ``row`` (candidates, pruned by
    the bound, dropped by the valve)."""
    keep = np.flatnonzero(bound <= threshold)
    row[:] = (bound.size, bound.size - keep.size, 0)
    if keep.size > max_pairs:
        keep = keep[np.argpartition(bound[keep], max_pairs - 1)[:max_pairs]]
        keep.sort()
        row[2] = row[0] - row[1] - max_pairs
        certified = False
    return keep, certified


def _expand(csr, cell, origin):
    """Pairs (member, same origin) of pairs (``cell``, ``origin``) through ``csr`` = ``(start,
    members)``: the members of cell ``c`` are ``members[start[c]:start[c + 1]]``."""
    start, members = csr
    counts = start[cell + 1] - start[cell]
    owner = np.repeat(np.arange(cell.size), counts)
    offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (members[start[cell][owner] + np.arange(owner.size) - offset[owner]].astype(np.int64),
            origin[owner])


def _children_pairs(tables: GridTables, level: int, cell, origin):
    """The pairs (child cell at ``level + 1``, same origin) of pairs at ``level``."""
    return _expand(tables.children[level], cell, origin)


def _descendant_pairs(tables: GridTables, level: int, cell, origin):
    """The pairs (finest descendant, same origin) of pairs at ``level``."""
    return _expand(tables.members[level], cell, origin)


def _exact_errors(tables: GridTables, data: ParticleData, b: int, cell, origins_px,
                  r_align: float) -> np.ndarray:
    """True errors of pairs (finest cell, origin), computed as :func:`.pose_search.
    exhaustive_search` computes them (complex128, the search's own pixel order)."""
    if cell.size == 0:
        return np.zeros(0)
    part = _Particle(data, b, band_pixels(tables.box, 0.0, r_align))
    uniq, inv = np.unique(cell, return_inverse=True)
    slices = _slices(tables.reference, tables.box, tables.rotations(tables.last, uniq),
                     part.kx, part.ky)
    err, _ = _pair_errors(part, slices, inv.ravel(), origins_px)
    return err
