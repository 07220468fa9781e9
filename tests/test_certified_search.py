"""The certified branch and bound (:mod:`dask_refine.core.certified_search`): its cell bound
holds over every finest descendant at the rate its failure probability allows, on images drawn
from the model the bound assumes; its ancestry partitions the finest grid; it returns the
exhaustive optimum and says when its safety valve cut a search."""

import numpy as np
import pytest

from dask_refine.core import so3_grid
from dask_refine.core.certified_search import (BoundSettings, GridTables, _ancestry,
                                               _cell_bounds, _Energies, _finest_bounds,
                                               _pair_cross, certified_search)
from dask_refine.core.ctf import ctf_rfft
from dask_refine.core.fourier import centred_rfftn, rfft_frequencies
from dask_refine.core.pose_search import (ParticleData, SearchParams, exhaustive_search,
                                          reachable_origins)
from dask_refine.core.projection import extract_central_slices_rfft, prepare_reference_rfft

BOX = 16
PARAMS = SearchParams(r_align=6.0, particle_radius_px=0.4 * BOX, first_level=1, last_level=3,
                      max_shift_px=1.0, shift_step_px=1.0)
#: every coarser level evaluated (level 1: 64 descendants a cell), two bands at level 2
ALL_LEVELS = dict(level_bands=((3.0,), (3.0, 4.0)))


def _blob_map(rng) -> np.ndarray:
    """A random smooth map: a few Gaussian blobs inside the box."""
    x = np.arange(BOX) - BOX // 2
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    volume = np.zeros((BOX,) * 3)
    for _ in range(int(rng.integers(3, 7))):
        c = rng.uniform(-3.5, 3.5, 3)
        r = rng.uniform(1.2, 2.5)
        volume += rng.uniform(0.5, 1.0) * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2
                                                    + (xx - c[2]) ** 2) / r ** 2)
    return volume.astype(np.float32)


def _model_particles(rng, reference, n: int, noise_sd: float):
    """Images drawn from the search's model: the scaled, CTF-modulated slice of the reference at
    a finest-grid rotation, at a reachable origin, plus white Gaussian noise (real space,
    variance ``noise_sd²``); the noise weights ``w = 1/σ²`` of that noise in the centred rfft.
    Returns ``(data, true finest cell index, true origin index)``."""
    d, p = so3_grid.all_cells(PARAMS.last_level)
    cells = rng.integers(0, d.size, n)
    rotations = so3_grid.cell_rotations(PARAMS.last_level, d[cells], p[cells])
    origins = reachable_origins(PARAMS)
    o_index = rng.integers(0, origins.shape[0], n)
    ky, kx = rfft_frequencies(BOX, 2)
    phase = np.exp(2j * np.pi * (kx[None] * origins[o_index, 0, None, None]
                                 + ky[None] * origins[o_index, 1, None, None]) / BOX)
    ctf = ctf_rfft(BOX, 3.0, defocus_u_A=rng.uniform(8e3, 2e4, n),
                   defocus_v_A=rng.uniform(8e3, 2e4, n), defocus_angle_deg=rng.uniform(0, 180, n),
                   phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n),
                   voltage_kV=np.full(n, 300.0), cs_mm=np.full(n, 2.7),
                   amplitude_contrast=np.full(n, 0.1))
    scale = rng.uniform(0.7, 1.3, n)
    signal = extract_central_slices_rfft(reference, rotations, BOX) * ctf * scale[:, None, None]
    noise = centred_rfftn(rng.standard_normal((n, BOX, BOX)) * noise_sd, 2)
    weight = np.full((BOX, BOX // 2 + 1), 1.0 / (BOX * BOX * noise_sd ** 2))
    return ParticleData(signal * phase + noise, ctf, scale, weight), cells, o_index


def test_ancestry_partitions_the_finest_grid():
    """Each finest cell has one ancestor per level, the one :func:`so3_grid.parent_cells` gives,
    and the descendants of a level's cells are the whole finest grid, once each."""
    anc, cells, parent = _ancestry(1, 3, "C1")
    fd, fp = cells[3]
    assert fd.size == so3_grid.n_rotations(3)
    d, p = fd, fp
    for lvl in (2, 1):
        pd_, pp = so3_grid.parent_cells(lvl + 1, d, p)
        cd, cp = cells[lvl]
        np.testing.assert_array_equal(cd[anc[lvl]], pd_)
        np.testing.assert_array_equal(cp[anc[lvl]], pp)
        d, p = pd_, pp
        counts = np.bincount(anc[lvl], minlength=cd.size)
        assert counts.sum() == fd.size and counts.min() >= 1


@pytest.mark.parametrize("noise_sd", [0.05, 0.2])
def test_cell_bound_holds_over_every_descendant_at_the_stated_rate(noise_sd):
    """``LB(c, t) ≤ min_{d ∈ D(c)} E(d, t)`` for every candidate pair (cell, origin) of each
    coarser level, with ε = 0.05: the bound may fail only at the rate its three Gaussian events
    (one per evaluation each) allow; measured over all pairs of random maps and particles."""
    rng = np.random.default_rng(int(noise_sd * 1000))
    failures = pairs = 0
    for _ in range(2):
        reference = prepare_reference_rfft(_blob_map(rng))
        data, _, _ = _model_particles(rng, reference, 2, noise_sd)
        settings = BoundSettings(epsilon=0.05, **ALL_LEVELS)
        tables = GridTables(reference, BOX, PARAMS, settings)
        tau = 1.6448536269514722  # Φ⁻¹(0.95)
        origins = reachable_origins(PARAMS)
        for b in range(2):
            q, shifted, norm_cum, energy = _particle_terms(tables, data, b, origins)
            m_full = tables.pixels.size
            # the true error of every finest pose
            n_t = origins.shape[0]
            fine = np.repeat(np.arange(tables.n_finest), n_t)
            org = np.tile(np.arange(n_t), tables.n_finest)
            cross = np.zeros(fine.size)
            _pair_cross(tables.finest, shifted, fine, org, 0, m_full, cross)
            e_full = tables.finest_power.astype(np.float64) @ q
            err = (norm_cum[m_full] + e_full[fine] - 2 * cross).reshape(-1, n_t)
            for lvl, steps in tables.steps.items():
                n_cells = tables.cells[lvl][0].size
                best = np.full((n_cells, n_t), np.inf)
                np.minimum.at(best, tables.anc[lvl], err)
                for band in steps:
                    m = tables.n_pixels(band)
                    cell = np.repeat(np.arange(n_cells), n_t)
                    org = np.tile(np.arange(n_t), n_cells)
                    cr = np.zeros(cell.size)
                    _pair_cross(tables.centres[lvl], shifted, cell, org, 0, m, cr)
                    bound = _cell_bounds(tables, lvl, m, q, energy, tau, cell, cr, norm_cum[m],
                                         norm_cum[m_full])
                    failures += int(np.count_nonzero(bound > best.ravel() + 1e-6))
                    pairs += bound.size
    assert pairs > 100_000
    assert failures <= 3 * 0.05 * pairs


def _particle_terms(tables, data, b, origins):
    """``(q, shifted images, cumulative ‖X‖², finest energies at every band the tables use)``
    of particle ``b``, as the search computes them."""
    x = data.images_rfft[b].ravel()[tables.pixels]
    c = data.ctf[b].ravel()[tables.pixels]
    mw = tables.mult * data.noise_weight.ravel()[tables.pixels]
    s = float(data.scale[b])
    q = (s * c) ** 2 * mw
    shifted = x[None] * np.exp(-2j * np.pi * (np.outer(origins[:, 0], tables.kx)
                                               + np.outer(origins[:, 1], tables.ky)) / BOX) \
        * (mw * s * c)[None]
    norm_cum = np.concatenate([[0.0], np.cumsum(mw * np.abs(x) ** 2)])
    bands = [b_ for steps in tables.steps.values() for b_ in steps] + list(tables.cascade)
    energy = _Energies(tables, q, {tables.n_pixels(b_) for b_ in bands})
    return q, shifted, norm_cum, energy


def test_bound_at_the_true_pose_fails_at_most_at_the_stated_rate():
    """Where it matters (the true pose and its ancestors): over 60 particles of the model with
    ε = 0.05, the bound exceeds the true pose's error at most at the rate its Gaussian events
    allow (2 at the finest level, 3 at a coarser one), at every level and band."""
    rng = np.random.default_rng(5)
    settings = BoundSettings(epsilon=0.05, **ALL_LEVELS)
    tau = 1.6448536269514722  # Φ⁻¹(0.95)
    failures, trials = {}, 0
    for _ in range(3):
        reference = prepare_reference_rfft(_blob_map(rng))
        tables = GridTables(reference, BOX, PARAMS, settings)
        data, cells, o_index = _model_particles(rng, reference, 20, 0.3)
        origins = reachable_origins(PARAMS)
        for b in range(20):
            q, shifted, norm_cum, energy = _particle_terms(tables, data, b, origins)
            m_full = tables.pixels.size
            d, t = np.array([cells[b]]), np.array([o_index[b]])
            cross = np.zeros(1)
            _pair_cross(tables.finest, shifted, d, t, 0, m_full, cross)
            true = norm_cum[m_full] + energy.exact(d, m_full) - 2 * cross
            trials += 1
            for lvl, steps in tables.steps.items():
                c = tables.anc[lvl][d]
                for band in steps:
                    m = tables.n_pixels(band)
                    cr = np.zeros(1)
                    _pair_cross(tables.centres[lvl], shifted, c, t, 0, m, cr)
                    lb = _cell_bounds(tables, lvl, m, q, energy, tau, c, cr, norm_cum[m],
                                      norm_cum[m_full])
                    failures[(lvl, band)] = failures.get((lvl, band), 0) + int(lb[0] > true[0])
            for band in tables.cascade[:-1]:
                m = tables.n_pixels(band)
                cr = np.zeros(1)
                _pair_cross(tables.finest, shifted, d, t, 0, m, cr)
                lb = _finest_bounds(energy, m, tau, d, norm_cum[m] + energy.exact(d, m) - 2 * cr,
                                    norm_cum[m], norm_cum[m_full])
                failures[("finest", band)] = failures.get(("finest", band), 0) + int(
                    lb[0] > true[0])
    assert trials == 60
    for key, count in failures.items():
        allowed = 3 if key[0] != "finest" else 2
        assert count <= allowed * 0.05 * trials + 2, (key, count)


def test_returns_the_exhaustive_optimum_and_says_when_the_valve_fired():
    """On particles of the model at two noise levels the search returns the finest grid's
    optimum (the exhaustive search's error) for every particle, certified, with less work
    than the exhaustive search; with a tiny safety valve the particles are flagged."""
    rng = np.random.default_rng(11)
    reference = prepare_reference_rfft(_blob_map(rng))
    for noise_sd in (0.05, 0.15):
        data, _, _ = _model_particles(rng, reference, 4, noise_sd)
        exhaustive = exhaustive_search(reference, data, PARAMS)
        every = certified_search(reference, data, PARAMS, BoundSettings(**ALL_LEVELS))
        np.testing.assert_allclose(every.error, exhaustive.error, rtol=1e-9)
        result = certified_search(reference, data, PARAMS)  # the defaults: level 1 expanded
        np.testing.assert_allclose(result.error, exhaustive.error, rtol=1e-9)
        assert result.certified.all() and every.certified.all()
        assert (result.pruning[:, :, 2] == 0).all()
        assert (result.pruning[:, :, 1] > 0).any()  # the bound pruned
        # the best candidate is the result, and within the window of itself
        for b, (rots, _, errs) in enumerate(result.candidates):
            assert errs[0] == pytest.approx(result.error[b])
    capped = certified_search(reference, data, PARAMS, BoundSettings(max_pairs=50))
    assert not capped.certified.any()
    assert (capped.pruning[:, :, 2] > 0).any(axis=1).all()


def test_local_searches_are_refused():
    rng = np.random.default_rng(0)
    reference = prepare_reference_rfft(_blob_map(rng))
    data, _, _ = _model_particles(rng, reference, 1, 0.1)
    local = SearchParams(**{**PARAMS.__dict__, "local": True})
    with pytest.raises(ValueError, match="global"):
        certified_search(reference, data, local)
